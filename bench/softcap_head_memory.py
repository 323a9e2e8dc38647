"""Peak memory of the training loss through Gemma 2's softcapped head: the row blocks vs the full logits.

    .venv/bin/python -m bench.softcap_head_memory [--tokens 1024] [--hidden 256] [--vocab 256000]

Each path runs in its own child process (the peak resident set is per process): a frozen SoftcappedHead (cap 30,
Gemma 2's final_logit_softcapping) in bf16, hidden states (tokens x hidden) that need a gradient, the summed
cross-entropy and its backward; "uncapped": the row blocks of a plain Linear head of the same shape (what the other
families spend). The peak is read from the kernel (VmHWM after resetting it through
/proc/self/clear_refs, Linux), less the resident set before the loss: what the loss itself adds. CPU only; not part of
`make test`.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(path: str, tokens: int, hidden: int, vocab: int) -> dict[str, float]:
    import torch

    from pipeline.model import head_loss

    torch.manual_seed(0)
    head = head_loss.SoftcappedHead(hidden, vocab, 30.0) if path != "uncapped" else torch.nn.Linear(hidden, vocab, False)
    head = head.to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    before = _status_kib("VmRSS")
    if path == "plain":
        with head_loss.plain_head():
            head_loss.head_cross_entropy_sum(head, x, targets).backward()
    else:
        head_loss.head_cross_entropy_sum(head, x, targets).backward()
    return {"path": path, "peak_added_mib": round((_status_kib("VmHWM") - before) / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=256000)  # Gemma 2's
    parser.add_argument("--child", choices=("plain", "chunked", "uncapped"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.hidden, args.vocab)))
        return
    logits_mib = args.tokens * args.vocab * 4 / 2 ** 20
    results = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "fp32_logits_mib": round(logits_mib)}
    for path in ("plain", "chunked", "uncapped"):
        out = subprocess.run([sys.executable, "-m", "bench.softcap_head_memory", "--child", path, "--tokens",
                              str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab)],
                             check=True, capture_output=True, text=True).stdout
        results[path] = json.loads(out)["peak_added_mib"]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
