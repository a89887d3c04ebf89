"""`nla_meta.yaml`: the sidecar every NLA checkpoint carries, in both dialects found in the wild.

* ``kind: nla_model``, ``schema_version: 2`` (the paper's checkpoints, and what nla_lens writes);
* ``kind: nla_dataset``, ``schema_version: 1`` (the dataset sidecar nanoNLA copies into checkpoints).

Neither dialect records how the vector was injected, so [`parse_meta`][nla_lens.sidecar.parse_meta] applies
the rule of the README's "How the vector gets in": a ``nla_dataset`` sidecar (nanoNLA) means the Karvonen
add at ``blocks.1.hook_resid_post``, an AV's ``nla_model`` sidecar with an ``injection_scale`` means
embedding replacement at ``hook_embed``; sidecars written by nla_lens carry an explicit ``injection:`` block.
Everything here is pure: tokenizer checks take the tokenizer as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from nla_lens.errors import ChatTemplateError, MarkerError, SidecarError, TokenizerDriftError
from nla_lens.markers import find_marker_sites

SIDECAR_NAME = "nla_meta.yaml"
InjectionMethod = Literal["karvonen", "embedding"]
DEFAULT_HOOK_POINT: dict[str, str] = {
    # Output of decoder layer 1, where nanoNLA / Activation Oracles add the vector.
    "karvonen": "blocks.1.hook_resid_post",
    # The token embedding (after any embedding scale), which the paper's checkpoints replace.
    "embedding": "hook_embed",
}
_ROLES: dict[str, Literal["av", "ar"]] = {"av": "av", "actor": "av", "ar": "ar", "critic": "ar"}


@dataclass(frozen=True)
class InjectionSpec:
    """How and where a vector enters the AV's forward pass."""

    method: InjectionMethod
    hook_point: str

    @classmethod
    def of(cls, method: str, hook_point: str | None = None) -> InjectionSpec:
        """`method` "karvonen" or "embedding"; `hook_point` defaults to the method's site in training
        (`DEFAULT_HOOK_POINT`: `blocks.1.hook_resid_post`, `hook_embed`). An unknown method is a `SidecarError`."""
        if not isinstance(method, str) or method not in DEFAULT_HOOK_POINT:
            raise SidecarError(
                f"unknown injection method {method!r}; use one of {sorted(DEFAULT_HOOK_POINT)}"
            )
        return cls(method, hook_point or DEFAULT_HOOK_POINT[method])  # type: ignore[arg-type]


@dataclass(frozen=True)
class NLAMeta:
    """The facts of one NLA checkpoint, read from its sidecar (never hard-coded)."""

    kind: str  # the dialect: "nla_model" or "nla_dataset"
    schema_version: int
    role: Literal["av", "ar"] | None  # None in an nla_dataset sidecar: the folder's files tell
    d_model: int
    layer: int  # K: the NLA reads blocks.K.hook_resid_post of the base model
    injection_char: str
    injection_token_id: int
    injection_left_neighbor_id: int
    injection_right_neighbor_id: int
    critic_suffix_ids: tuple[int, ...] | None
    av_template: str | None
    ar_template: str | None
    mse_scale: float  # the L2 norm both vectors are rescaled to for MSE / FVE; sqrt(d_model) unless the sidecar says
    injection_scale: float | None  # the norm embedding replacement writes; None where the sidecar has none
    injection: InjectionSpec | None  # the sidecar's injection block, else its dialect's rule; None if neither says
    base_model: str | None = None  # the base model's hub id or folder, as the sidecar names it
    fve_baseline: float | None = None  # paper baseline of held-out vectors, as recorded at export
    fve_baseline_n: int | None = None  # how many vectors it was measured on
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    source: str = field(default="sidecar", repr=False, compare=False)  # where it was read: its file, for messages

    def av_prompt(self) -> str:
        """The AV's user message with the marker char filled in."""
        if self.av_template is None:
            raise SidecarError("this sidecar has no AV (actor) prompt template")
        return self.av_template.replace("{injection_char}", self.injection_char)

    def ar_prompt(self, explanation: str) -> str:
        """The AR's input text for one explanation."""
        if self.ar_template is None:
            raise SidecarError("this sidecar has no AR (critic) prompt template")
        return self.ar_template.replace("{explanation}", explanation)


def safe_load_unique(text: str) -> Any:
    """`yaml.safe_load` (no code runs) that refuses a key given twice in one mapping, where PyYAML keeps the
    last silently: a hand-edited sidecar with two `extraction_layer_index:` lines, a config with two `steps:`."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping (`safe_load_unique`): a YAML error, told apart so that a config's
    message can say to delete one of the two instead of calling the whole file unreadable."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """Checks each mapping's own keys before its merge keys (`<<: *anchor`) are expanded: a key that overrides a
    merged one is how YAML changes a default, not a key given twice."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._checked: set[yaml.Node] = set()  # a merged mapping is flattened again when read on its own

    def flatten_mapping(self, node: yaml.MappingNode) -> None:
        if node not in self._checked:
            self._checked.add(node)
            self._check_own_keys(node)
        super().flatten_mapping(node)

    def _check_own_keys(self, node: yaml.MappingNode) -> None:
        seen = set()
        for key_node, _ in node.value:
            key = None if key_node.tag == _MERGE_TAG else self.construct_object(key_node)
            if key_node.tag == _MERGE_TAG or not isinstance(key, Hashable):  # SafeLoader names an unhashable key
                continue
            if key in seen:
                raise DuplicateKeyError(None, None, f"the key {key!r} is given twice", key_node.start_mark)
            seen.add(key)


_MERGE_TAG = "tag:yaml.org,2002:merge"


def run_exports(folder: str | Path, subfolders: tuple[str, ...]) -> list[str]:
    """The NLA exports (folders with a sidecar) among `subfolders` of `folder`: a training run's out_dir holds its
    export one level down (train-av / train-ar: model/, train-rl: av/ and ar/), and a user passes the out_dir."""
    return [str(Path(folder) / sub) for sub in subfolders if (Path(folder) / sub / SIDECAR_NAME).is_file()]


def load_meta(folder: str | Path) -> NLAMeta:
    """Read and parse `nla_meta.yaml` from a checkpoint folder (`safe_load_unique`, no code)."""
    path = Path(folder) / SIDECAR_NAME
    if not path.is_file():
        model = " It holds a model (config.json): a base model is not an NLA checkpoint." if (
            Path(folder) / "config.json").is_file() else ""
        exports = run_exports(folder, ("model", "av", "ar"))
        run = (f" It is a training run's out_dir (nla-lens curve {folder} shows the run); its export: "
               f"{' or '.join(exports)}." if exports else "")
        raise SidecarError(
            f"no {SIDECAR_NAME} in {folder}: an NLA checkpoint needs its sidecar.{model}{run} Pass an AV or AR "
            f"folder, or copy the {SIDECAR_NAME} released with the checkpoint into that folder."
        )
    try:
        data = safe_load_unique(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:  # e.g. re-saved as UTF-16 or Latin-1 by an editor
        raise SidecarError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 or "
                           "restore the released file") from exc
    except yaml.YAMLError as exc:
        raise SidecarError(f"{path} is not valid YAML ({exc}); restore the released file") from exc
    if data is None:  # an interrupted download or copy
        raise SidecarError(f"{path} is empty (or holds only comments); restore the {SIDECAR_NAME} released with the "
                           "checkpoint")
    return parse_meta(data, source=str(path))


def parse_meta(data: Any, *, source: str = "sidecar") -> NLAMeta:
    """Parse a sidecar mapping of either dialect into an [`NLAMeta`][nla_lens.sidecar.NLAMeta]."""
    if not isinstance(data, dict):
        raise SidecarError(f"{source}: expected a YAML mapping at the top level, got {type(data).__name__}; restore "
                           "the sidecar released with the checkpoint")
    kind = data.get("kind")
    if kind == "nla_model":
        return _parse_model_dialect(data, source)
    if kind == "nla_dataset":
        return _parse_dataset_dialect(data, source)
    raise SidecarError(
        f"{source}: unknown sidecar kind {kind!r}; nla_lens reads 'nla_model' (schema 2) and "
        "'nla_dataset' (schema 1). Check that this is an NLA checkpoint's nla_meta.yaml."
    )


def _parse_model_dialect(data: dict[str, Any], source: str) -> NLAMeta:
    _expect_schema(data, 2, source)
    role_name = data.get("role")
    if not isinstance(role_name, str) or role_name not in _ROLES:
        raise SidecarError(f"{source}: role must be one of {sorted(_ROLES)}, got {role_name!r}")
    role = _ROLES[role_name]
    extraction = _section(data, "extraction", source, required=False)
    critic = _section(data, "critic", source, required=False)
    ar = _section(data, "ar", source, required=False)
    d_model = _int(_agreed({"d_model": data.get("d_model"), "extraction.d_model": extraction.get("d_model")}, source),
                   "d_model", source, minimum=1)
    layer = _layer_of_model_dialect(data, extraction, critic, ar, source)
    injection_scale = _scale(extraction.get("injection_scale"), d_model, "injection_scale", source)
    injection = _explicit_injection(data, source)
    if injection is None and role == "av" and injection_scale is not None:
        injection = InjectionSpec.of("embedding")
    return _build(data, source, role=role, d_model=d_model, layer=layer,
                  extraction=extraction, injection_scale=injection_scale, injection=injection)


def _layer_of_model_dialect(data: dict[str, Any], extraction: dict[str, Any], critic: dict[str, Any],
                            ar: dict[str, Any], source: str) -> int | None:
    """Layer K from whichever keys the sidecar has; keys that disagree are refused, since any one of them
    picked would serve the checkpoint at a layer it may not have been trained on."""
    found = {name: _int(value, name, source) - offset for name, value, offset in (
        ("extraction_layer_index", data.get("extraction_layer_index"), 0),
        ("critic.extraction_layer_index", critic.get("extraction_layer_index"), 0),
        ("extraction.layer_index", extraction.get("layer_index"), 0),
        ("ar.num_hidden_layers", ar.get("num_hidden_layers"), 1),  # K + 1
        ("critic.num_hidden_layers", critic.get("num_hidden_layers"), 1),
    ) if value is not None}
    if len(set(found.values())) > 1:
        told = ", ".join(f"{name} -> K={k}" for name, k in found.items())
        raise SidecarError(f"{source}: the keys giving the extraction layer disagree ({told}); restore the released "
                           "nla_meta.yaml, or make them name the one layer K the NLA was trained on")
    return next(iter(found.values()), None)


def _parse_dataset_dialect(data: dict[str, Any], source: str) -> NLAMeta:
    _expect_schema(data, 1, source)
    extraction = _section(data, "extraction", source)
    d_model = _int(extraction.get("d_model"), "extraction.d_model", source, minimum=1)
    layer = extraction.get("layer_index")
    # The dialect reads extraction's keys; top-level ones (the nla_model dialect's spelling) must not contradict them.
    _agreed({"extraction.d_model": d_model, "d_model": data.get("d_model")}, source)
    _agreed({"extraction.layer_index": layer, "extraction_layer_index": data.get("extraction_layer_index")}, source)
    injection_scale = _scale(extraction.get("injection_scale"), d_model, "injection_scale", source)
    # nanoNLA trains with the Karvonen add at the output of decoder layer 1.
    injection = _explicit_injection(data, source) or InjectionSpec.of("karvonen")
    return _build(data, source, role=None, d_model=d_model, layer=layer,
                  extraction=extraction, injection_scale=injection_scale, injection=injection)


_PLACEHOLDERS = {"AV": ("{injection_char}", "where the marker goes", "the AV prompt takes one vector at one marker"),
                 "AR": ("{explanation}", "where the explanation goes", "the AR reads each explanation once")}


def template_problem(name: Literal["AV", "AR"], template: str) -> str | None:
    """What is wrong with a prompt template's placeholder, in words (None: it holds it exactly once), for the
    sidecar and the extract config to name with their own source and fix. Twice is not tokenizer drift: the AV
    injects one vector per prompt, at one marker; ar_prompt would fill every copy, and the critic suffix is read
    after the first (not how ARs train)."""
    placeholder, where, once = _PLACEHOLDERS[name]
    count = template.count(placeholder)
    if count == 0:
        return f"the {name} template has no '{placeholder}' placeholder, {where}"
    if count > 1:
        return (f"the {name} template holds the '{placeholder}' placeholder {count} times; {once}, so the template "
                "must hold it exactly once")
    return None


def _build(data: dict[str, Any], source: str, *, role: Literal["av", "ar"] | None, d_model: int,
           layer: Any, extraction: dict[str, Any], injection_scale: float | None,
           injection: InjectionSpec | None) -> NLAMeta:
    tokens = _section(data, "tokens", source)
    templates = _section(data, "prompt_templates", source)
    suffix = tokens.get("critic_suffix_ids")
    if suffix is not None and (not isinstance(suffix, list) or not suffix):
        raise SidecarError(f"{source}: tokens.critic_suffix_ids must be a non-empty list of token ids (or null), "
                           f"got {suffix!r}")
    av_template = _template(templates, "av", "actor", source)
    ar_template = _template(templates, "ar", "critic", source)
    named_templates: tuple[tuple[Literal["AV", "AR"], Any], ...] = (("AV", av_template), ("AR", ar_template))
    for name, template in named_templates:
        if template is not None and not isinstance(template, str):
            raise SidecarError(f"{source}: the {name} prompt template must be a string, got {template!r}")
    for name, template in named_templates:
        problem = None if template is None else template_problem(name, template)
        if problem is not None:
            raise SidecarError(f"{source}: {problem}; restore the released template")
    if layer is None:
        keys = ("extraction.layer_index" if data["kind"] == "nla_dataset" else "extraction_layer_index (or "
                "critic.extraction_layer_index, extraction.layer_index, ar.num_hidden_layers = K + 1)")
        raise SidecarError(f"{source}: no extraction layer; the sidecar needs {keys}, the layer K the NLA reads. "
                           "Restore the released nla_meta.yaml")
    fve_baseline, fve_baseline_n = _recorded_baseline(data, source)
    _check_tokenization(data, source)
    base_model = _agreed({"extraction.base_model": extraction.get("base_model"), "base_model": data.get("base_model")},
                         source)
    if base_model is not None and (not isinstance(base_model, str) or not base_model):
        raise SidecarError(f"{source}: base_model must be the base model's hub id or folder path as a string (or "
                           f"absent), got {base_model!r}; quote it in the YAML or delete the entry")
    injection_char = tokens.get("injection_char")
    if not isinstance(injection_char, str) or len(injection_char) == 0:
        raise SidecarError(f"{source}: tokens.injection_char must be a non-empty string")
    return NLAMeta(
        kind=data["kind"],
        schema_version=int(data["schema_version"]),  # 2.0 reads as 2
        role=role,
        d_model=d_model,
        layer=_int(layer, "the extraction layer index", source, minimum=0),
        injection_char=injection_char,
        injection_token_id=_int(tokens.get("injection_token_id"), "tokens.injection_token_id", source),
        injection_left_neighbor_id=_int(
            tokens.get("injection_left_neighbor_id"), "tokens.injection_left_neighbor_id", source
        ),
        injection_right_neighbor_id=_int(
            tokens.get("injection_right_neighbor_id"), "tokens.injection_right_neighbor_id", source
        ),
        critic_suffix_ids=None if suffix is None else tuple(_int(i, "critic_suffix_ids", source) for i in suffix),
        av_template=av_template,
        ar_template=ar_template,
        mse_scale=_scale(extraction.get("mse_scale"), d_model, "mse_scale", source) or math.sqrt(d_model),
        injection_scale=injection_scale,
        injection=injection,
        base_model=base_model,
        fve_baseline=fve_baseline,
        fve_baseline_n=fve_baseline_n,
        raw=data,
        source=source,
    )


def _agreed(found: dict[str, Any], source: str) -> Any:
    """The value the keys of `found` that the sidecar has give (None where it has none). Two that disagree are
    refused, naming both: a sidecar that contradicts itself does not say which one the checkpoint was trained with."""
    present = {name: value for name, value in found.items() if value is not None}
    values = list(present.values())
    if any(value != values[0] for value in values[1:]):
        told = " but ".join(f"{name} is {value!r}" for name, value in present.items())
        raise SidecarError(f"{source} contradicts itself: {told}; restore the released {SIDECAR_NAME}, or make both "
                           "give the value the NLA was trained with")
    return values[0] if values else None


def _template(templates: dict[str, Any], name: str, old_name: str, source: str) -> Any:
    """A role's prompt template under either dialect's key; both keys with different texts leave no way to
    tell which one the checkpoint was trained on."""
    if name in templates and old_name in templates and templates[name] != templates[old_name]:
        raise SidecarError(f"{source}: prompt_templates.{name} and prompt_templates.{old_name} are two spellings of "
                           f"one template but hold different texts; keep the one the checkpoint was trained with "
                           "(restore the released file)")
    return templates.get(name, templates.get(old_name))


def _recorded_baseline(data: dict[str, Any], source: str) -> tuple[float | None, int | None]:
    """`fve_baseline: {value, n}`, which sidecars nla_lens exports carry (absent from the released ones)."""
    block = data.get("fve_baseline")
    if block is None:
        return None, None
    value = block.get("value") if isinstance(block, dict) else None
    n = block.get("n") if isinstance(block, dict) else None
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf
            or isinstance(n, bool) or not isinstance(n, int) or n < 2):
        raise SidecarError(f"{source}: fve_baseline must be a mapping {{value: a positive number, n: an integer "
                           f">= 2}}, got {block!r}; fix it or delete the block")
    return float(value), n


_TOKENIZATION_KEYS = ("base_text", "ar_prompt", "bos_token_id")  # the block `tokenization_record` writes


def _check_tokenization(data: dict[str, Any], source: str) -> None:
    """The `tokenization:` block, whose `bos_token_id` `check_tokenizer` compares with the live tokenizer's BOS. One
    that is not a mapping, or spells that key otherwise, skipped the check without a word."""
    block = data.get("tokenization")
    if block is None:
        return
    if not isinstance(block, dict):
        raise SidecarError(f"{source}: tokenization must be a mapping {{{', '.join(_TOKENIZATION_KEYS)}}} (its "
                           f"bos_token_id is checked against the tokenizer), got {block!r}; restore the sidecar as "
                           "written, or delete the block")
    unknown = sorted(map(str, block.keys() - _TOKENIZATION_KEYS))
    if unknown:
        raise SidecarError(f"{source}: tokenization has keys {unknown} that nla_lens does not read; it reads "
                           f"{list(_TOKENIZATION_KEYS)}. Fix the spelling or delete them")
    bos = block.get("bos_token_id")
    if bos is not None:
        _int(bos, "tokenization.bos_token_id", source, minimum=0)


_INJECTION_KEYS = ("method", "hook_point")  # the `injection:` block sidecars nla_lens writes


def _explicit_injection(data: dict[str, Any], source: str) -> InjectionSpec | None:
    block = data.get("injection")
    if block is None:
        return None
    if not isinstance(block, dict) or "method" not in block:
        raise SidecarError(f"{source}: 'injection' must be a mapping with a 'method' key")
    unknown = sorted(map(str, block.keys() - _INJECTION_KEYS))
    if unknown:  # a misspelt `hook_point` was ignored, and the AV served at the method's default site
        raise SidecarError(f"{source}: injection has keys {unknown} that nla_lens does not read; it reads "
                           f"{list(_INJECTION_KEYS)}. Fix the spelling or delete them")
    hook_point = block.get("hook_point")
    if hook_point is not None and (not isinstance(hook_point, str) or not hook_point.strip()):
        raise SidecarError(f"{source}: injection.hook_point must be a TransformerLens hook name such as "
                           f"'blocks.1.hook_resid_post' (or absent for the method's default), got {hook_point!r}")
    return InjectionSpec.of(block["method"], hook_point)


def _expect_schema(data: dict[str, Any], version: int, source: str) -> None:
    if isinstance(data.get("schema_version"), bool) or data.get("schema_version") != version:  # `true` == 1
        raise SidecarError(
            f"{source}: kind {data.get('kind')!r} is read at schema_version {version}, "
            f"found {data.get('schema_version')!r}; upgrade nla_lens or fix the sidecar"
        )


def _section(data: dict[str, Any], key: str, source: str, required: bool = True) -> dict[str, Any]:
    value = data.get(key)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise SidecarError(f"{source}: missing or malformed section '{key}' (expected a mapping)")
    return value


def _int(value: Any, name: str, source: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SidecarError(f"{source}: {name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise SidecarError(f"{source}: {name} must be >= {minimum}, got {value}")
    return value


def _scale(value: Any, d_model: int, name: str, source: str) -> float | None:
    """Resolve a scale entry: absent/null -> None, "sqrt_d_model" -> sqrt(d), a number -> itself."""
    if value is None:
        return None
    if value == "sqrt_d_model":
        return math.sqrt(d_model)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf:
        return float(value)
    raise SidecarError(f"{source}: {name} must be a positive finite number or 'sqrt_d_model', got {value!r}")


def check_role_template(meta: NLAMeta, role: Literal["av", "ar"] | None, folder: str | Path) -> None:
    """The prompt template the role's prompts are built from (AV: av / actor, AR: ar / critic) is there."""
    names = {"av": ("av_template", "AV (actor)", "av or .actor"), "ar": ("ar_template", "AR (critic)", "ar or .critic")}
    if role is not None and getattr(meta, names[role][0]) is None:
        _, label, keys = names[role]
        raise SidecarError(f"{folder}/{SIDECAR_NAME} has no {label} prompt template (prompt_templates.{keys}); restore "
                           f"the sidecar released with this {role.upper()}")


def av_prompt_ids(meta: NLAMeta, tokenizer: Any) -> list[int]:
    """Token ids of the canonical AV prompt: one user message, chat template, generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            "the AV tokenizer has no chat template; load the tokenizer saved with the AV checkpoint "
            "(its tokenizer_config.json carries the template)"
        )
    messages = [{"role": "user", "content": meta.av_prompt()}]
    # Qwen3: no enable_thinking argument, exactly as the AV was trained.
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def prepends_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS first when it adds its special tokens (Gemma, Llama; not Qwen).

    The training code tokenizes base text and AR prompts that way, so a TL model built here keeps
    `default_prepend_bos` equal to this: `model.to_tokens(text)` then gives the tokens it trained on.
    """
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer.encode("a", add_special_tokens=True)[:1] == [bos]


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Base-model text as the training code tokenized it to extract activations (kitft
    `nla/datagen/extractors.py`): with the tokenizer's special tokens, so BOS first where the
    tokenizer has one (Gemma, Llama) and nothing added for Qwen. A text that already starts with that BOS
    (e.g. copied from `to_str_tokens` or a chat-formatted prompt) keeps its one BOS: a second one is no
    token the base model was trained to read there, and moves every residual after it. Where the tokenizer
    adds no BOS (one whose bos_token it never puts first), the text's own tokens are all kept."""
    ids = list(tokenizer.encode(text, add_special_tokens=True))
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and ids[:2] == [bos, bos] and prepends_bos(tokenizer) else ids


def ar_prompt_ids(meta: NLAMeta, tokenizer: Any, explanation: str) -> list[int]:
    """The AR prompt as the paper's critic tokenizes it: with special tokens (BOS first on Gemma /
    Llama; dropping it costs the Gemma pair FVE 0.77 -> 0.31, kitft `nla_inference.py`)."""
    return list(tokenizer.encode(meta.ar_prompt(explanation), add_special_tokens=True))


def tokenization_record(tokenizer: Any) -> dict[str, Any]:
    """The `tokenization:` block of sidecars nla_lens writes: how base text and AR prompts were
    tokenized, and the BOS that put first (null where the tokenizer adds none)."""
    first = text_ids(tokenizer, "a")[:1]
    bos = tokenizer.bos_token_id
    return {"base_text": "add_special_tokens", "ar_prompt": "add_special_tokens",
            "bos_token_id": bos if bos is not None and first == [bos] else None}


def check_tokenizer(meta: NLAMeta, tokenizer: Any, role: Literal["av", "ar"] | None = None, *,
                    source: str | None = None,
                    tokenizer_of: Literal["checkpoint", "extraction"] = "checkpoint") -> None:
    """Check the sidecar's token facts against the live tokenizer; raise `TokenizerDriftError` on any drift (a
    `SidecarError` naming `source`, by default where `meta` was read from, where the AV template itself
    holds a second marker). Loading an AR (`role="ar"`) skips the AV's chat prompt, which an AR's tokenizer need
    not be able to build. `tokenizer_of` says whose tokenizer the facts are, which decides the advice: a
    checkpoint's own, or (SFT, `meta` drafted from an extraction) the one the extraction's base model used."""
    source = source or meta.source
    fix = _drift_fix(meta, tokenizer_of)
    marker_ids = tokenizer.encode(meta.injection_char, add_special_tokens=False)
    if len(marker_ids) != 1:
        raise TokenizerDriftError(
            f"marker {meta.injection_char!r} is {len(marker_ids)} tokens {marker_ids} in this tokenizer, but "
            f"the injection marker must be exactly one token: {fix}"
        )
    if marker_ids != [meta.injection_token_id]:
        raise TokenizerDriftError(
            f"marker {meta.injection_char!r} encodes to {marker_ids}, but the sidecar says "
            f"[{meta.injection_token_id}]: {fix}"
        )
    if meta.av_template is not None and role != "ar":
        import torch

        ids = av_prompt_ids(meta, tokenizer)
        try:
            find_marker_sites(torch.tensor([ids]), meta.injection_token_id, meta.injection_left_neighbor_id,
                              meta.injection_right_neighbor_id, expected=1)
        except MarkerError as exc:
            text = meta.av_template.replace("{injection_char}", "")
            if meta.injection_token_id in tokenizer.encode(text, add_special_tokens=False):
                # Two markers for one vector, whatever the tokenizer: the template's fault, not drift.
                raise SidecarError(
                    f"{source}: the AV template {meta.av_template!r} holds the marker {meta.injection_char!r} itself "
                    "besides the '{injection_char}' placeholder, so its prompt would hold two markers for one vector; "
                    "write the marker only as the placeholder (restore the released template)"
                ) from exc
            raise TokenizerDriftError(
                f"the canonical AV prompt {_marker_context(meta, tokenizer, ids)}: {fix}"
            ) from exc
    recorded = meta.raw.get("tokenization")
    if isinstance(recorded, dict) and "bos_token_id" in recorded:
        live = tokenization_record(tokenizer)["bos_token_id"]
        if live != recorded["bos_token_id"]:
            raise TokenizerDriftError(
                f"the sidecar records BOS {recorded['bos_token_id']} first in base text and AR prompts, this "
                f"tokenizer puts {live}: {fix}"
            )
    if meta.critic_suffix_ids is not None and meta.ar_template is not None:
        ids = tokenizer.encode(meta.ar_prompt("a"), add_special_tokens=False)
        suffix = list(meta.critic_suffix_ids)
        if ids[-len(suffix):] != suffix:
            raise TokenizerDriftError(
                f"the AR prompt ends in ids {ids[-len(suffix):]}, the sidecar's critic_suffix_ids "
                f"are {suffix}: {fix}"
            )


def _drift_fix(meta: NLAMeta, tokenizer_of: Literal["checkpoint", "extraction"]) -> str:
    """What a drifted tokenizer means and how to fix it. A checkpoint was trained with the tokenizer saved beside
    it; an SFT sidecar's token facts are its extraction's, so the base model being trained must share its tokenizer."""
    if tokenizer_of == "extraction":
        used = "" if meta.base_model is None else f" ({meta.base_model})"
        return (f"the base model's tokenizer is not the one the activations were extracted with ({meta.source}). "
                f"Train with the base model the extraction used{used}")
    return ("the tokenizer is not the one this NLA was trained with. Load the tokenizer saved with the checkpoint "
            "(tokenizer.json, tokenizer_config.json, its chat template)")


def _marker_context(meta: NLAMeta, tokenizer: Any, ids: list[int]) -> str:
    """Where the AV prompt's marker sits, beside the neighbours the sidecar records: the ids that drifted."""
    at = [i for i, token in enumerate(ids) if token == meta.injection_token_id]
    if len(at) != 1:
        return f"holds the marker id {meta.injection_token_id} {len(at)} times, where training put it once"
    live = [ids[j] if 0 <= j < len(ids) else None for j in (at[0] - 1, at[0] + 1)]
    shown = [f"{i} ({tokenizer.decode([i])!r})" if i is not None else "nothing" for i in live]
    return (f"has the marker {meta.injection_token_id} between {shown[0]} and {shown[1]}, but the sidecar records "
            f"{meta.injection_left_neighbor_id} and {meta.injection_right_neighbor_id} "
            "(tokens.injection_left_neighbor_id, injection_right_neighbor_id)")


def dump_meta(meta_dict: dict[str, Any], folder: str | Path) -> Path:
    """Write a sidecar mapping (validated by parsing it back) into `folder`."""
    parse_meta(meta_dict, source="sidecar to write")
    path = Path(folder) / SIDECAR_NAME
    path.write_text(yaml.safe_dump(meta_dict, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path
