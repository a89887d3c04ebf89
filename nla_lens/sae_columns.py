"""The columns of the result types whose modules need sae-lens: `FeatureVerbalizations`, `FeatureCard` and the toy
SAE experiment's `SAEExperimentResult`.

Declared here, with pyarrow alone, so that [`read_result`][nla_lens.results.read_result] checks a saved file of one
of them in any process: one that has not imported its module, and one without sae-lens (TransformerLens 4.x has
none). The types take their ``schema`` from these.
"""

from __future__ import annotations

import pyarrow as pa

from nla_lens.results import ResultColumns

# A saved row's record of the offset (None without one): enough to say which mean and spread the AV's vectors were
# built from, and to check stats recomputed from the same texts against them.
OFFSET_COLUMNS = {"offset_n": pa.int64(), "offset_layer": pa.int64(), "offset_mean_norm": pa.float64(),
                  "offset_spread": pa.float64()}

FEATURE_VERBALIZATIONS = ResultColumns("FeatureVerbalizations", pa.schema({
    "feature": pa.int64(), "explanation": pa.string(), "parsed": pa.bool_(), "text": pa.string(),
    "truncated": pa.bool_(), "cosine": pa.float64(), "hook_name": pa.string(), "offset": pa.bool_(),
    **OFFSET_COLUMNS}))

# The context_explanation_* columns are None without explain_contexts; with it, a failed parse's row has
# context_explanation None, context_explanation_parsed False and the raw completion in context_explanation_text.
# The card's own explanation has the same three as explanation_*: `text` is the index of a context's text.
FEATURE_CARD = ResultColumns("FeatureCard", pa.schema({
    "feature": pa.int64(), "text": pa.int64(), "position": pa.int64(), "token": pa.string(),
    "activation": pa.float64(), "context": pa.string(), "context_explanation": pa.string(),
    "context_explanation_parsed": pa.bool_(), "context_explanation_text": pa.string(),
    "context_explanation_truncated": pa.bool_(), "explanation": pa.string(), "explanation_parsed": pa.bool_(),
    "explanation_text": pa.string(), "explanation_truncated": pa.bool_(), "cosine": pa.float64(),
    "offset": pa.bool_(), **OFFSET_COLUMNS}))

SAE_EXPERIMENT = ResultColumns("SAEExperimentResult", pa.schema({
    "feature": pa.int64(), "token": pa.string(), "purity": pa.float64(), "explanation": pa.string(),
    "explanation_offset": pa.string(), "explanation_top_context": pa.string(), "named": pa.bool_(),
    "named_offset": pa.bool_(), "named_top_context": pa.bool_(), "control_token": pa.string(),
    "named_control": pa.bool_()}))
