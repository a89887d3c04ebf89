"""nla_lens: Natural Language Autoencoders in TransformerLens."""

from nla_lens.errors import (
    ChatTemplateError,
    CheckpointError,
    ConfigError,
    InjectionError,
    InputError,
    MarkerError,
    NLAError,
    PairMismatchError,
    PromptTooLongError,
    SidecarError,
    SplitLeakError,
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
    "ChatTemplateError",
    "CheckpointError",
    "ConfigError",
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
    "SplitLeakError",
    "TokenizerDriftError",
    "Verbalization",
    "VectorError",
    "load_meta",
    "parse_meta",
]
