"""The default weight format: `python -m setup.model encode` re-encodes the shipped Q4_1
file as Q8_0, keeps it only when its perplexity is at most 1 % worse, and records it; the
record makes it the default model, anything wrong with it falls back to the shipped file."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from setup import model as model_mod
from setup.model import ModelError

REPO = Path(__file__).resolve().parent.parent
FAKE_SHIPPED = b"GGUF fake shipped model " * 64


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty aiosfs data directory (AIOSFS_DATA); returns its models/ directory."""
    monkeypatch.setenv("AIOSFS_DATA", str(tmp_path / "data"))
    monkeypatch.delenv(model_mod.FAULT_ENV, raising=False)
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    return models


@pytest.fixture
def fake_shipped(data: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A small file in the shipped file's place, which verify() takes for the shipped model."""
    path = data / model_mod.SHIPPED_MODEL_FILE
    path.write_bytes(FAKE_SHIPPED)
    monkeypatch.setattr(model_mod, "MODEL_SIZE", len(FAKE_SHIPPED))
    monkeypatch.setattr(model_mod, "MODEL_SHA256", hashlib.sha256(FAKE_SHIPPED).hexdigest())
    return path


def write_encoded(models: Path, content: bytes = b"GGUF encoded" * 100, **changes: Any) -> tuple[Path, dict[str, Any]]:
    """An encoded file and a record that vouches for it; ``changes`` overrides top-level record entries."""
    path = models / model_mod.ENCODED_MODEL_FILE
    path.write_bytes(content)
    record: dict[str, Any] = {
        "record_version": model_mod.RECORD_VERSION,
        "format": "Q8_0",
        "source": {"file": model_mod.SHIPPED_MODEL_FILE, "size": model_mod.MODEL_SIZE, "sha256": model_mod.MODEL_SHA256},
        "encoded": {"file": path.name, "size": len(content), "sha256": hashlib.sha256(content).hexdigest()},
        "perplexity": {"source": 11.61, "encoded": 11.56, "ratio": 11.56 / 11.61, "tokens": 311},
    }
    record.update(changes)
    (models / model_mod.RECORD_NAME).write_text(json.dumps(record))
    return path, record


def fake_steps(encoded_ppl: float, calls: list[str]) -> Any:
    """Stands in for encode's children: the quantize child writes a file, the perplexity child reports a score."""

    def run_step(args: list[str], what: str, *, timeout: float) -> dict[str, Any]:
        calls.append(args[0])
        if args[0] == "quantize":
            Path(args[2]).write_bytes(b"GGUF q8_0 " * 200)
            return {"format": "Q8_0", "size": 2000, "seconds": 0.1}
        shipped = Path(args[1]).name == model_mod.SHIPPED_MODEL_FILE
        return {"path": args[1], "perplexity": 11.61 if shipped else encoded_ppl, "tokens": 311, "ctx": 256, "seconds": 0.2}

    return run_step


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "setup.model", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=timeout, check=False
    )


# --- the record decides the default ----------------------------------------------


def test_without_a_record_the_default_is_the_shipped_file(data: Path) -> None:
    assert model_mod.read_record() is None
    assert model_mod.encoded_model_path() is None
    assert model_mod.default_model_path() == model_mod.shipped_model_path() == data / model_mod.SHIPPED_MODEL_FILE


def test_a_valid_record_makes_the_encoded_file_the_default(data: Path) -> None:
    encoded, _ = write_encoded(data)
    assert model_mod.default_model_path() == encoded
    assert model_mod.shipped_model_path() == data / model_mod.SHIPPED_MODEL_FILE


def test_the_command_line_prints_the_default_and_the_shipped_path(data: Path) -> None:
    env = dict(os.environ)
    assert cli("path", env=env).stdout.strip() == str(data / model_mod.SHIPPED_MODEL_FILE)
    encoded, _ = write_encoded(data)
    assert cli("path", env=env).stdout.strip() == str(encoded)
    assert cli("path", "--shipped", env=env).stdout.strip() == str(data / model_mod.SHIPPED_MODEL_FILE)


@pytest.mark.parametrize(
    "spoil",
    ["missing file", "wrong size", "other source", "worse ratio", "other format", "old record version", "path in name", "not json"],
)
def test_a_record_that_does_not_hold_falls_back_to_the_shipped_file(data: Path, spoil: str) -> None:
    encoded, record = write_encoded(data)
    record_file = data / model_mod.RECORD_NAME
    if spoil == "missing file":
        encoded.unlink()
    elif spoil == "wrong size":
        encoded.write_bytes(encoded.read_bytes() + b"x")
    elif spoil == "other source":
        write_encoded(data, source={**record["source"], "sha256": "0" * 64})
    elif spoil == "worse ratio":
        write_encoded(data, perplexity={**record["perplexity"], "ratio": 1.02})
    elif spoil == "other format":
        write_encoded(data, format="Q4_0")
    elif spoil == "old record version":
        write_encoded(data, record_version=0)
    elif spoil == "path in name":
        write_encoded(data, encoded={**record["encoded"], "file": f"../models/{encoded.name}"})
    else:
        record_file.write_text("{not json")
    assert model_mod.default_model_path() == model_mod.shipped_model_path()


def test_verify_checks_the_encoded_default_against_its_record(data: Path, fake_shipped: Path) -> None:
    encoded, record = write_encoded(
        data, source={"file": model_mod.SHIPPED_MODEL_FILE, "size": model_mod.MODEL_SIZE, "sha256": model_mod.MODEL_SHA256}
    )
    assert model_mod.verify(model_mod.default_model_path()) == record["encoded"]["sha256"]
    assert model_mod.verify(fake_shipped) == model_mod.MODEL_SHA256
    encoded.write_bytes(encoded.read_bytes()[:-1] + b"!")  # same size, other content
    assert model_mod.default_model_path() == encoded
    with pytest.raises(ModelError, match=r"sha256.*\n.*model encode"):
        model_mod.verify(encoded)


# --- encode, with its children stood in for ---------------------------------------


def test_a_worse_perplexity_fails_leaves_no_record_and_removes_the_encoded_file(
    data: Path, fake_shipped: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(model_mod, "_run_step", fake_steps(11.61 * 1.02, calls))
    with pytest.raises(ModelError, match=r"2\.0 % worse.*\n.*shipped file stays the default"):
        model_mod.encode()
    assert calls == ["quantize", "perplexity", "perplexity"]
    assert not (data / model_mod.RECORD_NAME).exists()
    assert sorted(p.name for p in data.iterdir()) == [model_mod.SHIPPED_MODEL_FILE]
    assert fake_shipped.read_bytes() == FAKE_SHIPPED
    assert model_mod.default_model_path() == fake_shipped


def test_the_command_line_fails_with_a_worse_perplexity(
    data: Path, fake_shipped: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(model_mod, "_run_step", fake_steps(12.0, []))
    assert model_mod.main(["encode"]) == 1
    assert "worse than the shipped file's" in capsys.readouterr().err
    assert not (data / model_mod.RECORD_NAME).exists()


def test_a_good_perplexity_is_recorded_and_a_second_run_skips(
    data: Path, fake_shipped: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[str] = []
    monkeypatch.setattr(model_mod, "_run_step", fake_steps(11.60, calls))
    encoded = model_mod.encode()
    assert encoded == data / model_mod.ENCODED_MODEL_FILE and encoded.is_file()
    assert not list(data.glob("*.part"))
    record = json.loads((data / model_mod.RECORD_NAME).read_text())
    assert record["source"]["sha256"] == model_mod.MODEL_SHA256 and record["source"]["size"] == len(FAKE_SHIPPED)
    assert record["encoded"]["sha256"] == hashlib.sha256(encoded.read_bytes()).hexdigest()
    assert record["perplexity"]["ratio"] == pytest.approx(11.60 / 11.61, abs=1e-5)
    assert model_mod.default_model_path() == encoded
    capsys.readouterr()
    assert model_mod.encode() == encoded
    assert calls == ["quantize", "perplexity", "perplexity"]  # nothing ran the second time
    assert "already done" in capsys.readouterr().err
    encoded.write_bytes(encoded.read_bytes()[:-1] + b"!")  # a corrupt file of the same size is encoded again
    assert model_mod.encode() == encoded
    assert calls == ["quantize", "perplexity", "perplexity"] * 2


def test_a_child_killed_by_a_signal_is_reported_and_nothing_is_recorded(data: Path, fake_shipped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(model_mod.FAULT_ENV, "SIGILL")  # the real child process kills itself
    with pytest.raises(ModelError, match=r"killed by SIGILL") as info:
        model_mod.encode(timeout=120)
    assert "buildcheck check" in str(info.value) and "shipped file stays the default" in str(info.value)
    assert sorted(p.name for p in data.iterdir()) == [model_mod.SHIPPED_MODEL_FILE]
    assert model_mod.default_model_path() == fake_shipped


def test_encode_without_the_shipped_file_says_how_to_install_it(data: Path) -> None:
    with pytest.raises(ModelError, match=r"not installed.*\n.*model fetch"):
        model_mod.encode()


# --- the real thing ---------------------------------------------------------------


def generate(path: Path, prompt: str, tokens: int) -> str:
    from kernel.agents.config import AgentConfig
    from kernel.cores.backends import BatchEntry
    from kernel.cores.backends.llama import LlamaBackend

    backend = LlamaBackend(path, threads=2, n_slots=1, n_ctx_seq=256, n_batch=64)
    try:
        ids = backend.tokenize(backend.chat_prompt([{"role": "user", "content": prompt}]))
        assert backend.decode([BatchEntry(0, t, i, i == len(ids) - 1) for i, t in enumerate(ids)]) == 0
        sampler = backend.new_sampler(AgentConfig(temperature=0), seed=1)
        out = b""
        for n in range(tokens):
            token = backend.sample(sampler, -1)
            if backend.is_eog(token):
                break
            out += backend.piece(token)
            assert backend.decode([BatchEntry(0, token, len(ids) + n, True)]) == 0
        backend.free_sampler(sampler)
        return out.decode(errors="replace")
    finally:
        backend.close()


@pytest.mark.model
def test_the_real_encode_records_a_q8_0_default_as_good_as_the_shipped_file(model: Path, tmp_path: Path) -> None:
    models = tmp_path / "data" / "models"
    models.mkdir(parents=True)
    (models / model_mod.SHIPPED_MODEL_FILE).symlink_to(model)  # the fixture: the shipped file
    env = {**os.environ, "AIOSFS_DATA": str(tmp_path / "data")}
    env.pop(model_mod.FAULT_ENV, None)
    assert cli("path", env=env).stdout.strip() == str(models / model_mod.SHIPPED_MODEL_FILE)

    first = cli("encode", env=env)
    assert first.returncode == 0, first.stderr
    encoded = models / model_mod.ENCODED_MODEL_FILE
    assert first.stdout.strip() == str(encoded)
    record = json.loads((models / model_mod.RECORD_NAME).read_text())
    assert record["format"] == "Q8_0"
    assert record["source"] == {
        "file": model_mod.SHIPPED_MODEL_FILE,
        "path": str(models / model_mod.SHIPPED_MODEL_FILE),
        "size": model_mod.MODEL_SIZE,
        "sha256": model_mod.MODEL_SHA256,
    }
    assert record["encoded"]["size"] == encoded.stat().st_size
    assert record["encoded"]["sha256"] == hashlib.sha256(encoded.read_bytes()).hexdigest()
    ppl = record["perplexity"]
    assert ppl["ratio"] <= 1.01 and ppl["ratio"] == pytest.approx(ppl["encoded"] / ppl["source"], abs=1e-4)
    assert 5 < ppl["source"] < 30 and ppl["tokens"] > 300
    assert record["llama_cpp_version"] and record["encoded_at"]
    assert not list(models.glob("*.part"))
    assert hashlib.sha256(model.read_bytes()).hexdigest() == model_mod.MODEL_SHA256  # the original is untouched

    assert cli("path", env=env).stdout.strip() == str(encoded)
    assert cli("path", "--shipped", env=env).stdout.strip() == str(models / model_mod.SHIPPED_MODEL_FILE)
    assert cli("verify", env=env).returncode == 0
    text = generate(encoded, "What is the capital of France?", 12)
    assert "Paris" in text, text

    mtime = encoded.stat().st_mtime_ns
    second = cli("encode", env=env)
    assert second.returncode == 0, second.stderr
    assert "already done" in second.stderr
    assert encoded.stat().st_mtime_ns == mtime
    assert json.loads((models / model_mod.RECORD_NAME).read_text()) == record


# --- scripts/setup ----------------------------------------------------------------


def test_setup_encodes_last_after_the_check_and_skips_it_without_the_model() -> None:
    setup = REPO / "scripts" / "setup"
    assert subprocess.run(["bash", "-n", str(setup)], check=False).returncode == 0
    text = setup.read_text()
    check = text.index('run "${buildcheck[@]}" check')
    encode = text.index('run "$py" -m setup.model encode')
    assert check < encode < text.index('step "Done. Next:"')
    assert "Default weight format: skipped (--no-model)" in text
    assert "die " in text[encode : encode + 200]
    usage = subprocess.run(["bash", str(setup), "--help"], capture_output=True, text=True, check=True).stdout
    assert "python3 -m setup.model encode" in usage
