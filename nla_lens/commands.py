"""`nla-lens verbalize` and `nla-lens reconstruct`: the library's two halves from the shell."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor

from nla_lens.errors import InputError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def read_vectors(path: Path) -> Float[Tensor, "n d_model"]:
    """Vectors from .safetensors (a tensor named `vectors`, or the only one) or .pt (weights_only load)."""
    if path.suffix == ".safetensors":
        tensors = load_file(str(path))
        if "vectors" not in tensors and len(tensors) != 1:
            raise InputError(f"{path} holds {sorted(tensors)}; name the [n, d_model] tensor 'vectors'")
        return tensors.get("vectors", next(iter(tensors.values())))
    if path.suffix == ".pt":
        loaded = torch.load(path, weights_only=True)  # tensors only: no pickled code is run
        if not isinstance(loaded, Tensor):
            raise InputError(f"{path} must hold a single tensor, got {type(loaded).__name__}")
        return loaded
    raise InputError(f"{path}: expected a .safetensors or .pt file of [n, d_model] vectors")


def capture_text(base: str, layer: int, text: str, device: str, dtype: torch.dtype) -> Float[Tensor, "pos d_model"]:
    """`blocks.{layer}.hook_resid_post` of the base model at every position of `text`."""
    from nla_lens import backends, loading
    from nla_lens.capture import resid_post

    folder = loading.resolve_checkpoint(base)
    tokenizer = loading.load_tokenizer(folder)
    model = backends.load_model(folder, tokenizer, dtype=dtype, device=device)
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"--layer {layer} is outside the base model's {model.cfg.n_layers} blocks")
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)], device=device)
    with torch.inference_mode():
        return resid_post(model, ids, layer)[0].float()


def add_verbalize(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verbalize", help="explain activation vectors with an AV",
        description="Explain vectors with an activation verbalizer. Take them from a file (--vectors) or capture "
                    "them from a base model (--base, --layer, --text: every position of the text).")
    parser.add_argument("--av", required=True, help="the AV checkpoint folder (or a hub id in the local HF cache)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--vectors", type=Path, help=".safetensors (tensor 'vectors') or .pt file of [n, d_model]")
    source.add_argument("--text", help="text to run through --base; each of its positions is explained")
    parser.add_argument("--base", help="base model folder for --text (the model the AV reads)")
    parser.add_argument("--layer", type=int, help="layer K for --text (default: the AV's sidecar layer)")
    parser.add_argument("--max-new-tokens", type=int, default=150, help="longest explanation (default 150)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling at temperature > 0")
    parser.add_argument("--batch-size", type=int, default=32, help="vectors per AV batch")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model dtype")
    parser.add_argument("--output", type=Path, help="also write one JSON line per vector here")
    parser.set_defaults(run=_run_verbalize)


def _run_verbalize(args: argparse.Namespace) -> None:
    from nla_lens.verbalizer import ActivationVerbalizer

    av = ActivationVerbalizer.from_pretrained(args.av, device=args.device, dtype=_DTYPES[args.dtype])
    if args.text is not None:
        if args.base is None:
            raise InputError("--text needs --base, the model whose activations the AV explains")
        layer = av.meta.layer if args.layer is None else args.layer
        vectors = capture_text(args.base, layer, args.text, args.device, _DTYPES[args.dtype])
    else:
        vectors = read_vectors(args.vectors)
    out = av.verbalize(vectors, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                       batch_size=args.batch_size)
    lines = [json.dumps({"index": i, "explanation": v.explanation, "text": v.text}, ensure_ascii=False)
             for i, v in enumerate(out)]
    for i, v in enumerate(out):
        print(f"{i}\t{v.explanation if v.explanation is not None else '(no <explanation> tags) ' + v.text!r}")
    if args.output:
        args.output.write_text("\n".join(lines) + "\n", encoding="utf-8")


def add_reconstruct(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "reconstruct", help="rebuild activation vectors from explanations with an AR",
        description="Map explanations back to vectors with an activation reconstructor.")
    parser.add_argument("--ar", required=True, help="the AR checkpoint folder (or a hub id in the local HF cache)")
    parser.add_argument("explanations", nargs="*", help="explanation strings")
    parser.add_argument("--input", type=Path, help="a text file with one explanation per line")
    parser.add_argument("--output", type=Path, help="write the vectors here as .safetensors (tensor 'vectors')")
    parser.add_argument("--batch-size", type=int, default=64, help="explanations per AR batch")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="model dtype")
    parser.set_defaults(run=_run_reconstruct)


def _run_reconstruct(args: argparse.Namespace) -> None:
    from nla_lens.reconstructor import ActivationReconstructor

    texts = list(args.explanations)
    if args.input:
        texts += [line for line in args.input.read_text(encoding="utf-8").splitlines() if line.strip()]
    ar = ActivationReconstructor.from_pretrained(args.ar, device=args.device, dtype=_DTYPES[args.dtype])
    vectors = ar.reconstruct(texts, batch_size=args.batch_size)
    for i, v in enumerate(vectors):
        print(f"{i}\tnorm {float(v.norm()):.3f}\t{[round(x, 3) for x in v[:4].tolist()]} ...")
    if args.output:
        save_file({"vectors": vectors.contiguous().cpu()}, args.output)
