"""Make an NLA for a TransformerLens model: extract activations, build rows, SFT the AV and AR, RL, export.

    acts = extract_activations(base, tokenizer, documents, "acts", ExtractConfig(layer=K))
    data = label_activations(load_activations("acts"), "explanations.jsonl")
    train, held_out = split_by_document(data, eval_fraction=0.1)
    av = init_av(base_folder, load_activations("acts").meta)
    train_av(av, train, held_out, TrainConfig(steps=500))
    export_av(av, "my_av", base_folder)   # ActivationVerbalizer.from_pretrained("my_av")
    # RL from the exported SFT pair (`reference`: a second, frozen load of the SFT AV):
    train_rl(av, ar, reference, train.vectors, held_out.vectors, RLConfig(steps=100))

Under `torchrun`, run the same calls on every rank inside `nla_lens.distributed.process_group`:
`TrainConfig.data_parallel` picks DDP or FSDP (`nla_lens.training.parallel`).
"""

from nla_lens.training.ar_sft import ar_loss, evaluate_ar, init_ar, train_ar
from nla_lens.training.av_sft import av_loss, evaluate_av, init_av, train_av
from nla_lens.training.config import (
    ARRunConfig,
    AVRunConfig,
    ExtractConfig,
    ExtractRunConfig,
    RLConfig,
    RLRunConfig,
    TrainConfig,
    load_config,
)
from nla_lens.training.dataset import (
    ARRows,
    AVRows,
    ExtractionIdentity,
    LabelledActivations,
    ar_rows,
    av_rows,
    check_document_disjoint,
    label_activations,
    save_explanations,
    split_by_document,
)
from nla_lens.training.export import (
    export_ar,
    export_av,
    export_pair,
    freeze_weights_hf_lacks,
    hf_state_dict,
    model_sidecar,
)
from nla_lens.training.extraction import (
    ActivationDataset,
    ActivationRecord,
    Document,
    extract_activations,
    load_activations,
)
from nla_lens.training.loop import TrainResult
from nla_lens.training.pipeline import RLRunResult, RunResult, run_extract, run_train_ar, run_train_av, run_train_rl
from nla_lens.training.rl import train_rl
from nla_lens.training.runs import TrainingRun, read_training_run

__all__ = [
    "ARRows", "ARRunConfig", "AVRows", "AVRunConfig", "ActivationDataset", "ActivationRecord", "Document",
    "ExtractConfig", "ExtractRunConfig", "ExtractionIdentity", "LabelledActivations", "RLConfig", "RLRunConfig",
    "RLRunResult", "RunResult", "TrainConfig", "TrainResult", "TrainingRun", "ar_loss", "ar_rows", "av_loss",
    "av_rows", "check_document_disjoint", "evaluate_ar", "evaluate_av", "export_ar", "export_av", "export_pair",
    "extract_activations", "freeze_weights_hf_lacks", "hf_state_dict", "init_ar", "init_av", "label_activations",
    "load_activations", "load_config", "model_sidecar", "read_training_run", "run_extract", "run_train_ar",
    "run_train_av", "run_train_rl", "save_explanations", "split_by_document", "train_ar", "train_av", "train_rl",
]
