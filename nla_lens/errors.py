"""Typed errors. Each message says what was wrong and how to fix it."""


class NLAError(Exception):
    """Base class of every error nla_lens raises on bad input."""


class SidecarError(NLAError):
    """`nla_meta.yaml` is missing, malformed, or of an unknown dialect."""


class TokenizerDriftError(NLAError):
    """The live tokenizer disagrees with the ids recorded in the sidecar."""


class MarkerError(NLAError):
    """The injection marker is missing, duplicated, or its sites do not match the vectors."""


class VectorError(NLAError):
    """Activation vectors have the wrong shape, dtype, device, or non-finite / zero values."""


class CheckpointError(NLAError):
    """A checkpoint folder lacks a file, or its files are damaged or disagree (weights, config.json, tokenizer)."""


class PairMismatchError(NLAError):
    """An AV and an AR that were not trained as one NLA (different d_model or layer) or that were passed AR first,
    or a base model or layer that the NLA does not read."""


class PromptTooLongError(NLAError):
    """A prompt does not fit the model's context window."""


class ChatTemplateError(NLAError):
    """The tokenizer has no chat template, so the AV prompt cannot be built."""


class InjectionError(NLAError):
    """An injection cannot be set up or applied: a hook point the AV lacks, embedding replacement without an
    injection_scale, or a hook run on activations it was not built for."""


class InputError(NLAError):
    """A call got arguments it cannot work with (empty input, out-of-range settings)."""


class SplitLeakError(NLAError):
    """Train and eval rows share a document, so held-out scores would be inflated."""


class ConfigError(NLAError):
    """A training, extraction or job setting is unknown, out of range, or contradicts saved state."""


class BackendError(NLAError):
    """The requested TransformerLens backend is unavailable, or misbehaves, with the installed versions."""


class SAEMismatchError(NLAError):
    """An SAE reads another activation than the NLA verbalizes (hook point or width)."""
