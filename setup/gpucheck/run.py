"""The GPU check's four steps, one after another, inside one time budget.

Every step that runs llama.cpp runs in child processes, so a build that faults on
the device is a verdict, not a lost run; the results are written after each step (JSON
and markdown), so whatever finished before a crash or the end of the budget is kept.
A step that would start with too little time left is skipped and says so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..kit import with_path
from . import STARTED, child_env, run_child, say
from . import build as build_mod
from . import speed as speed_mod
from .report import markdown

MIN_STEP_S = 20.0  # a step with less time left than this is skipped


@dataclass(frozen=True)
class Sizes:
    sequences: tuple[int, ...]  # step 3: sequences (agents, slots) of each identity run
    agents: tuple[int, ...]  # step 4: B
    tokens: int  # step 3: greedy tokens an answer
    ceiling: tuple[int, ...]  # step 4: agents of the host-ceiling runs
    ceiling_tokens: int


FULL = Sizes((1, 4, 16), (1, 16, 64), 32, (16, 64), 500)
QUICK = Sizes((1, 4), (1, 4), 8, (4,), 200)


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.gpu = not args.cpu
        self.sizes = QUICK if args.quick else FULL
        self.work: Path = (args.work or Path("/tmp") / ("aiosfs-gpu-check" if self.gpu else "aiosfs-gpu-check-cpu")).absolute()
        self.out: Path = (args.out or self.work / "results").absolute()
        self.deadline = STARTED + args.budget
        self.site: Path | None = None
        self.threads: int = args.threads or (2 if args.cpu else min(8, os.cpu_count() or 1))
        self.results: dict[str, Any] = {
            "version": 1,
            "mode": "gpu" if self.gpu else "cpu",
            "quick": bool(args.quick),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "budget_s": args.budget,
            "threads": self.threads,
            "sizes": asdict(self.sizes),
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": sys.version.split()[0]},
            "steps": {},
        }

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def save(self) -> None:
        self.results["wall_s"] = round(time.monotonic() - STARTED, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu-check.json").write_text(json.dumps(self.results, indent=1) + "\n")
        (self.out / "gpu-check.md").write_text(markdown(self.results))

    def step(self, name: str, result: dict[str, Any]) -> None:
        self.results["steps"][name] = result
        say(f"{name}: {result['verdict']} - {result.get('detail', '')}")
        self.save()

    def skip(self, name: str, why: str) -> None:
        self.step(name, {"verdict": "skipped", "detail": why})

    # -- the model -----------------------------------------------------------------------------
    def model(self) -> Path:
        """--model, else the bundle's model written out to its full depth, else (--cpu) the shipped model."""
        from . import gguf

        args = self.args
        if args.model is not None:
            path: Path = args.model.absolute()
            self.results["model"] = {"path": str(path), "note": "given with --model"}
        elif args.bundle is not None:
            manifest = json.loads((args.bundle / "manifest.json").read_text())["model"]
            path = self.work / "model.gguf"
            header = gguf.expand(args.bundle / manifest["file"], path, manifest["layers"])
            self.results["model"] = {**manifest, "path": str(path), "layers_written": header.block_count}
        else:
            from ..model import shipped_model_path

            path = shipped_model_path()
            self.results["model"] = {"path": str(path), "note": "the shipped model"}
        if not path.is_file():
            raise SystemExit(f"gpu-check: model file {path} not found (pass --model, or run scripts/setup)")
        self.results["model"]["bytes"] = path.stat().st_size
        return path

    # -- the steps -----------------------------------------------------------------------------
    def build(self) -> str | None:
        """Step 1; the llama-server it built, if any."""
        args = self.args
        if not self.gpu:
            self.skip("build", "--cpu: the llama-cpp-python build already installed is used as it is")
            return None
        src = args.src or (args.bundle and next(iter(sorted(args.bundle.glob("llama-cpp-python-*.tar.gz"))), None))
        if src is None:
            self.step("build", {"verdict": "failed", "detail": "no source tree: pass --src (an sdist or a tree) or --bundle"})
            return None
        wheels = args.bundle / "wheels" if args.bundle else None
        jobs = args.jobs or os.cpu_count() or 1
        reserve = 0 if args.build_only else 3 * 60  # steps 2 to 4 take about 2 minutes on a GPU
        if args.reuse_build and build_mod.has_cuda_build(self.work / "site"):
            result = build_mod.reused(self.work)
        else:
            result = build_mod.build(Path(src), self.work, wheels=wheels, deadline=self.deadline - reserve, jobs=jobs, server=not args.no_server)
        if result["verdict"] == "ok":
            self.site = Path(result["site"])
            sys.path.insert(0, str(self.site))  # for step 2's parent, which looks at the installed build
            os.environ["PYTHONPATH"] = with_path(dict(os.environ), self.site)["PYTHONPATH"]
        self.step("build", result)
        return str(result.get("llama_server") or "") or None

    def offload(self, model: Path) -> None:
        if self.left() < MIN_STEP_S:
            return self.skip("offload", f"out of time ({self.left():.0f} s left)")
        if self.gpu and self.results["steps"]["build"]["verdict"] != "ok":
            return self.skip("offload", "no build to check")
        self.step("offload", build_mod.offload(model, gpu=self.gpu, threads=self.threads, timeout=min(300.0, self.left())))
        return None

    def identity(self, model: Path) -> None:
        if self.gpu and self.results["steps"]["offload"]["verdict"] != "ok":
            return self.skip("identity", "the build did not pass step 2")
        tokens = self.sizes.tokens
        runs: list[dict[str, Any]] = []
        result: dict[str, Any] = {"verdict": "skipped", "runs": runs, "tokens": tokens}
        for n in self.sizes.sequences:
            if self.left() < MIN_STEP_S:
                runs.append({"sequences": n, "error": "skipped: out of time"})
                continue
            say(f"identity: {n} sequences, KV sharing on then off, {tokens} tokens an answer")
            runs.append({"sequences": n, **self.child(["kv-share", "--sequences", str(n)], tokens)})
        say(f"identity: prefill chunks against one ubatch, and batch composition, {tokens} greedy tokens")
        tiles = self.child(["tiles"], tokens) if self.left() >= MIN_STEP_S else {"error": "skipped: out of time"}
        result["tiles"] = judge_tiles(tiles)
        done = [r for r in runs if "error" not in r]
        if any(not r["identical"] for r in done):
            result["verdict"] = "differs"
        elif done:
            result["verdict"] = "identical" if len(done) == len(runs) else "identical (partial)"
        elif runs:
            result["verdict"] = "failed"
        sizes = [r["sequences"] for r in done]
        company = {True: "does not depend", False: "depends", None: "not measured"}[result["tiles"].get("decode_independent_of_company")]
        result["detail"] = (
            f"answers with KV sharing on and off at {sizes} sequences: {result['verdict']}; tile rule: {result['tiles']['verdict']}; "
            f"a sequence's decode {company} on what shares its ubatch"
        )
        self.step("identity", result)
        return None

    def child(self, what: list[str], tokens: int) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "setup.gpucheck", "identity", *what, "--model", str(self.results["model"]["path"])]
        cmd += ["--threads", str(self.threads), "--tokens", str(tokens)]
        ran = run_child(cmd, timeout=min(300.0, self.left()), env=child_env(self.site))
        line = next((x for x in reversed(ran.stdout.splitlines()) if x.startswith("{")), "")
        if ran.returncode == 0 and line:
            out: dict[str, Any] = json.loads(line)
            return out
        return {"error": build_mod.ran_detail(ran), "stderr_tail": ran.tail()}

    def speed(self, model: Path, built_server: str | None) -> None:
        if self.left() < MIN_STEP_S:
            return self.skip("speed", f"out of time ({self.left():.0f} s left)")
        if self.gpu and self.results["steps"]["offload"]["verdict"] != "ok":
            return self.skip("speed", "the build did not pass step 2")
        server, how = speed_mod.find_llama_server(self.args.llama_server, built_server)
        ceiling_s = min(120.0, self.left() / 4)
        result = speed_mod.bench(
            model,
            list(self.sizes.agents),
            threads=self.threads,
            work=self.work,
            server=server,
            gpu=self.gpu,
            timeout=self.left() - ceiling_s,
            site=self.site,
        )
        result["llama_server"] = f"{server} ({how})" if server else how
        raw = self.work / "bench" / "results.json"
        if raw.is_file():  # every request's timestamps, beside our summary
            self.out.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(raw, self.out / "bench-results.json")
        result["ceiling"] = speed_mod.ceiling(list(self.sizes.ceiling), self.sizes.ceiling_tokens, timeout=ceiling_s, site=self.site)
        self.step("speed", result)
        return None

    def run(self) -> int:
        self.work.mkdir(parents=True, exist_ok=True)
        if self.gpu:
            self.results["machine"].update(build_mod.gpu_info())
            os.environ["LD_LIBRARY_PATH"] = build_mod.cuda_library_path()
        say(
            f"{'GPU' if self.gpu else 'CPU'} check{' (quick)' if self.args.quick else ''}: work {self.work}, results {self.out}, budget {self.args.budget:.0f} s"
        )
        built_server = self.build()
        if self.args.build_only:
            self.save()
            return 0 if self.results["steps"]["build"]["verdict"] == "ok" else 1
        model = self.model()
        self.offload(model)
        self.identity(model)
        self.speed(model, built_server)
        self.save()
        print(markdown(self.results))
        say(f"results: {self.out / 'gpu-check.json'}, {self.out / 'gpu-check.md'}")
        verdicts = [s["verdict"] for s in self.results["steps"].values()]
        return 1 if any(v in ("failed", "differs") for v in verdicts) else 0


def judge_tiles(tiles: dict[str, Any]) -> dict[str, Any]:
    """Which chunk sizes give the one-ubatch logits, and whether the CPU's rule (whole 64-row tiles) holds."""
    if "error" in tiles:
        return {"verdict": "not measured", **tiles}
    from kernel import params

    rows = tiles["rows"]
    same = [r["chunk"] for r in rows if r["logits_identical"] and r["greedy_identical"]]
    tile = params.PREFILL_TILE
    multiples = [r["chunk"] for r in rows if r["chunk"] % tile == 0]
    sizes = [r["chunk"] for r in rows]
    # the smallest size whose every tried multiple gives the one-ubatch result
    measured = next((s for s in sorted(sizes) if all(c in same for c in sizes if c % s == 0)), None)
    if multiples and all(c in same for c in multiples):
        verdict = "holds" if measured == tile else f"holds (identical from {measured}-row chunks)"
    else:
        verdict = "does not hold"
    company = tiles.get("batch") or []
    invariant = all(c["logits_identical_steps"] == c["steps"] for c in company) if company else None
    return {
        **tiles,
        "verdict": verdict,
        "identical_chunks": same,
        "tile_measured": measured,
        "cpu_tile": tile,
        "sizes": sizes,
        "decode_independent_of_company": invariant,
    }
