"""nla_lens: Natural Language Autoencoders in TransformerLens."""

__version__ = "0.1.0"  # the package version (pyproject.toml reads it from here)

from nla_lens import toy
from nla_lens.base_model import load_base
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
from nla_lens.explain import ExplainedToken, Explanation, explain
from nla_lens.injection import Injection
from nla_lens.nla import NLA, RoundTrip
from nla_lens.reconstructor import ActivationReconstructor
from nla_lens.results import TabularResult, read_result
from nla_lens.sidecar import InjectionSpec, NLAMeta, load_meta, parse_meta
from nla_lens.steer_words import Difference, WordSteering, describe_difference, steer_with_words
from nla_lens.verbalizer import ActivationVerbalizer, Verbalization, Verbalizations

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
    "ExplainedToken",
    "Explanation",
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
    "TabularResult",
    "TokenizerDriftError",
    "Verbalization",
    "Verbalizations",
    "VectorError",
    "WordSteering",
    "capture",
    "describe_difference",
    "explain",
    "load_base",
    "load_meta",
    "parse_meta",
    "patching_study",
    "read_result",
    "steer_then_verbalize",
    "steer_with_words",
    "toy",
    "verbalize_direction",
]

# SAE features need the optional `sae` extra (sae-lens, TransformerLens 3.x only): imported on first use,
# so that a missing or incompatible sae-lens raises nla_lens's BackendError there and nowhere else.
_SAE_NAMES = {"verbalize_sae_features": "nla_lens.sae", "residual_stats": "nla_lens.sae",
              "ResidualStats": "nla_lens.sae", "FeatureVerbalizations": "nla_lens.sae",
              "hooked_sae_transformer": "nla_lens.sae", "feature_card": "nla_lens.feature_cards",
              "FeatureCard": "nla_lens.feature_cards", "SAEMismatchError": "nla_lens.errors"}


def __getattr__(name: str):
    if name in _SAE_NAMES:
        from importlib import import_module

        return getattr(import_module(_SAE_NAMES[name]), name)
    raise AttributeError(f"module 'nla_lens' has no attribute {name!r}")
