"""nla_lens: Natural Language Autoencoders in TransformerLens."""

from nla_lens.errors import (
    BackendError,
    ChatTemplateError,
    CheckpointError,
    InjectionError,
    InputError,
    MarkerError,
    NLAError,
    PairMismatchError,
    PromptTooLongError,
    SidecarError,
    TokenizerDriftError,
    VectorError,
)
from nla_lens.injection import Injection
from nla_lens.nla import NLA, RoundTrip
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import InjectionSpec, NLAMeta, load_meta, parse_meta
from nla_lens.verbalizer import ActivationVerbalizer, Verbalization

__all__ = [
    "NLA",
    "ActivationReconstructor",
    "ActivationVerbalizer",
    "BackendError",
    "ChatTemplateError",
    "CheckpointError",
    "Injection",
    "InjectionError",
    "InjectionSpec",
    "InputError",
    "MarkerError",
    "NLAError",
    "NLAMeta",
    "PairMismatchError",
    "PromptTooLongError",
    "RoundTrip",
    "SidecarError",
    "TokenizerDriftError",
    "Verbalization",
    "VectorError",
    "load_meta",
    "parse_meta",
]
