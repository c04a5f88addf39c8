#!/usr/bin/env bash
# Summarise every text file of a directory into the agent's memory, through files only.
#
#   summarize.sh [--agent AGENT_DIR] [INPUT_DIR]
#
# AGENT_DIR defaults to $AIOSFS_AGENT_DIR (set by the manifest supervisor), INPUT_DIR
# to $SUMMARIZE_INPUT. For each regular file of INPUT_DIR, in name order:
#
#   echo "Summarize ... <text>" > prompt     # one job
#   cat error                                # a newest line "ERRNO - …": the request was refused
#   cat output                               # the answer; non-zero exit: the job failed
#   echo reset > ctl                         # forget the turn before the next file
#
# and the answer goes to memory/summaries/NAME.md. memory/summaries/INDEX.md lists
# every file with its summary or why it failed. A failure is logged and the next file
# is tried. Exit status: 0 when every file was summarised, 1 when some failed, 2 on a
# usage or setup error.
set -u

prog=summarize
log() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
    log "$*"
    exit 2
}

agent=${AIOSFS_AGENT_DIR:-}
input=${SUMMARIZE_INPUT:-}
while [ $# -gt 0 ]; do
    case $1 in
        --agent) [ $# -ge 2 ] || die "--agent needs a directory"; agent=$2; shift 2 ;;
        --agent=*) agent=${1#--agent=}; shift ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        -*) die "unknown option $1 (usage: summarize.sh [--agent AGENT_DIR] [INPUT_DIR])" ;;
        *) input=$1; shift ;;
    esac
done
[ -n "$agent" ] || die "no agent directory: pass --agent DIR or set AIOSFS_AGENT_DIR"
[ -n "$input" ] || die "no input directory: pass INPUT_DIR or set SUMMARIZE_INPUT"
[ -d "$input" ] || die "$input: not a directory"
for file in prompt output error status ctl memory; do
    [ -e "$agent/$file" ] || die "$agent/$file: missing (is $agent an aiosfs agent directory?)"
done

out=$agent/memory/summaries
mkdir -p "$out" || die "mkdir $out failed"

# Reads a small file of the agent; says which one when it cannot.
read_file() {
    local text
    if ! text=$(cat "$1"); then
        log "$1: cannot read it"
        return 1
    fi
    printf '%s' "$text"
}

index=()
failed=0
shopt -s nullglob
for path in "$input"/*; do
    [ -f "$path" ] || continue
    name=${path##*/}
    log "$name: asking for a summary"

    # The request. A refusal that the write shows (EINVAL, EFBIG...) fails printf; one
    # that only the commit sees (E2BIG) is not reported by bash, so the error file
    # tells: a successful submit empties it, and its last line is the newest refusal.
    # A refusal made no job: its second field is "-". A line that names a job (a
    # cancel that came at once, say) is that job's end, which `cat output` reports.
    if ! text=$(cat "$path"); then
        log "$path: cannot read it; skipped"
        index+=("- $name: failed (unreadable)")
        failed=$((failed + 1))
        continue
    fi
    written=yes
    printf 'Summarize the following text in one sentence.\n\n%s\n' "$text" >"$agent/prompt" || written=no
    refused=$(read_file "$agent/error") || refused="(error unreadable)"
    refused=${refused##*$'\n'}
    read -r _ job_field _ <<<"$refused"
    if [[ $job_field =~ ^[0-9]+$ ]] && [ "$written" = yes ]; then
        refused=""  # a job was made: its end is for `cat output` to tell
    fi
    if [ -z "$refused" ] && [ "$written" = no ]; then
        refused="(the prompt could not be written)"
    fi
    if [ -n "$refused" ]; then
        log "$name: refused: $refused"
        index+=("- $name: failed (${refused%% *})")
        failed=$((failed + 1))
        continue
    fi

    # The answer. A failed or cancelled job prints its partial answer and exits non-zero.
    if ! summary=$(cat "$agent/output"); then
        why=$(read_file "$agent/error")
        why=${why##*$'\n'}
        log "$name: the job failed: ${why:-no error recorded}; status: $(read_file "$agent/status")"
        index+=("- $name: failed (${why%% *})")
        failed=$((failed + 1))
        echo reset >"$agent/ctl" || log "$agent/ctl: reset failed"
        continue
    fi
    if [ -z "${summary//[[:space:]]/}" ]; then
        log "$name: the model gave an empty answer; skipped"
        index+=("- $name: failed (empty answer)")
        failed=$((failed + 1))
        continue
    fi

    printf '# %s\n\n%s\n' "$name" "$summary" >"$out/$name.md" || {
        log "$out/$name.md: write failed"
        index+=("- $name: failed (could not store the summary)")
        failed=$((failed + 1))
        continue
    }
    index+=("- [$name]($name.md): ${summary//$'\n'/ }")
    log "$name: stored $out/$name.md"

    # Forget this turn so the next file starts from an empty conversation.
    echo reset >"$agent/ctl" || log "$agent/ctl: reset failed"
done

{
    printf '# Summaries of %s\n\n' "$input"
    if [ ${#index[@]} -eq 0 ]; then
        printf 'No files.\n'
    else
        printf '%s\n' "${index[@]}"
    fi
} >"$out/INDEX.md" || die "$out/INDEX.md: write failed"
log "${#index[@]} files, $failed failed; index in $out/INDEX.md"
[ "$failed" -eq 0 ]
