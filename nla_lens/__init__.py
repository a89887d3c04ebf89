"""nla_lens: Natural Language Autoencoders in TransformerLens."""

from nla_lens.capture import Capture, CapturedRow, capture
from nla_lens.errors import (
    BackendError,
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
from nla_lens.experiments import (
    DirectionVerbalization,
    PatchingRow,
    PatchingStudy,
    SteeringResult,
    SteeringRow,
    patching_study,
    steer_then_verbalize,
    verbalize_direction,
)
from nla_lens.injection import Injection
from nla_lens.nla import NLA, RoundTrip
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.sidecar import InjectionSpec, NLAMeta, load_meta, parse_meta
from nla_lens.steer_words import Difference, WordSteering, describe_difference, steer_with_words
from nla_lens.verbalizer import ActivationVerbalizer, Verbalization

__all__ = [
    "NLA",
    "ActivationReconstructor",
    "ActivationVerbalizer",
    "BackendError",
    "Capture",
    "CapturedRow",
    "ChatTemplateError",
    "CheckpointError",
    "ConfigError",
    "Difference",
    "DirectionVerbalization",
    "Injection",
    "InjectionError",
    "InjectionSpec",
    "InputError",
    "MarkerError",
    "NLAError",
    "NLAMeta",
    "PairMismatchError",
    "PatchingRow",
    "PatchingStudy",
    "PromptTooLongError",
    "RoundTrip",
    "SidecarError",
    "SplitLeakError",
    "SteeringResult",
    "SteeringRow",
    "TokenizerDriftError",
    "Verbalization",
    "VectorError",
    "WordSteering",
    "capture",
    "describe_difference",
    "load_meta",
    "parse_meta",
    "patching_study",
    "steer_then_verbalize",
    "steer_with_words",
    "verbalize_direction",
]
