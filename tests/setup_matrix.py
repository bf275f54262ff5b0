"""The DeepSpeed set-ups a user can write, one cell each: what it is, how the test builds it, and what must happen
(AutoWU trains on the right loss, or one line refuses it before the first step). Read by
``tests/ds_scripts/setups.py`` (which runs the cells on real engines), ``tests/test_setups.py`` (which checks what
they did) and ``docs/setups.md`` (its table is rendered from here, and a test keeps the two equal)."""
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple


@dataclass(frozen=True)
class Cell:
    name: str
    axis: str                       # the axis a user chooses along
    what: str                       # the set-up, in a user's words
    config: Dict = field(default_factory=dict)   # merged into the base config (None values remove a key)
    gas: int = 1                    # micro-batches an optimizer step
    caller_scales: bool = False     # the loop passes loss / gas with scale_wrt_gas=False (as HF's Trainer does)
    unmanaged: bool = False         # "managed_gradient_accumulation": false: the loop steps once per gas backwards
    client_optimizer: Optional[str] = None   # "sgd", "adamw": a torch optimizer passed to initialize
    pipeline: bool = False          # the model a PipelineModule
    half: Optional[str] = None      # "fp16" / "bf16": the model's dtype for the forward pass
    ranks: Tuple[int, ...] = (2,)   # the rank counts it runs on
    refused: Optional[str] = None   # words of the one line that refuses it (None: it trains)
    autowu: bool = True             # whether the config selects AutoWU

    @property
    def trains(self) -> bool:
        return self.refused is None


ADAMP = {"type": "AdamP", "params": {"weight_decay": 0.1}}
ADAMW = {"type": "AdamW", "params": {"lr": 1.0, "weight_decay": 0.1, "torch_adam": True}}
NO_OPTIMIZER = {"optimizer": None, "zero_allow_untested_optimizer": True}

CELLS = (
    Cell("fp32_zero1_adamp", "precision", "fp32, ZeRO-1, AdamP (the launcher's CPU default)", ranks=(1, 2, 3, 4)),
    Cell("fp16_zero1_adamp", "precision", "fp16, ZeRO-1, AdamP (the paper's settings)",
         {"fp16": {"enabled": True, "initial_scale_power": 8}}, half="fp16"),
    Cell("bf16_zero1_adamp", "precision", "bf16, ZeRO-1, AdamP", {"bf16": {"enabled": True}}, half="bf16"),
    Cell("bf16_fp32_accumulation_zero1_adamp", "precision",
         "bf16 with fp32 gradient accumulation (DeepSpeed's BF16_Optimizer), ZeRO-1, AdamP",
         {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}, half="bf16"),
    Cell("bf16_fp32_accumulation_no_zero", "precision", "bf16 with fp32 gradient accumulation without ZeRO",
         {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}, "zero_optimization": {"stage": 0},
          "optimizer": ADAMW}, half="bf16", refused="data_types.grad_accum_dtype 'fp32' with a bf16 model needs ZeRO"),
    Cell("fp16_no_zero_adamp", "precision", "fp16 without ZeRO, AdamP",
         {"fp16": {"enabled": True}, "zero_optimization": {"stage": 0}}, half="fp16",
         refused="optimizer AdamP with fp16 needs ZeRO stage 1 or 2"),
    Cell("fp16_no_zero_adamw", "precision", "fp16 without ZeRO, AdamW (rollback off with a warning)",
         {"fp16": {"enabled": True, "initial_scale_power": 8}, "zero_optimization": {"stage": 0},
          "optimizer": ADAMW}, half="fp16"),
    Cell("zero0_adamp", "ZeRO", "no ZeRO, fp32, AdamP", {"zero_optimization": {"stage": 0}}),
    Cell("zero2_adamp", "ZeRO", "ZeRO-2, AdamP", {"zero_optimization": {"stage": 2}}, ranks=(2, 3)),
    Cell("zero3_adamw", "ZeRO", "ZeRO-3, AdamW (rollback off with a warning)",
         {"zero_optimization": {"stage": 3}, "optimizer": ADAMW}),
    Cell("zero3_adamp", "ZeRO", "ZeRO-3, AdamP", {"zero_optimization": {"stage": 3}},
         refused="optimizer AdamP with ZeRO stage 3: not supported"),
    Cell("zero2_offload_adamw", "ZeRO", "ZeRO-2 with the optimizer offloaded, a torch AdamW passed in",
         {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
          "zero_force_ds_cpu_optimizer": False, **NO_OPTIMIZER}, client_optimizer="adamw"),
    Cell("zero2_offload_adamp", "ZeRO", "ZeRO-2 with the optimizer offloaded, AdamP",
         {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
         refused="optimizer AdamP with zero_optimization.offload_optimizer"),
    Cell("accumulation4", "accumulation", "4 micro-batches a step, DeepSpeed scales the loss", gas=4,
         ranks=(1, 2, 3)),
    Cell("accumulation4_caller_scales", "accumulation",
         "4 micro-batches a step, the loop passes loss / 4 with scale_wrt_gas=False (HF's Trainer)", gas=4,
         caller_scales=True),
    Cell("accumulation4_unmanaged", "accumulation",
         "4 micro-batches a step, \"managed_gradient_accumulation\": false (the loop steps once per 4)",
         {"managed_gradient_accumulation": False}, gas=4, unmanaged=True),
    Cell("torch_sgd", "optimizer", "a torch SGD passed to initialize, ZeRO-1",
         {"zero_optimization": {"stage": 1}, **NO_OPTIMIZER}, client_optimizer="sgd"),
    Cell("config_adamw", "optimizer", "DeepSpeed's AdamW from the config, ZeRO-1", {"optimizer": ADAMW}),
    Cell("deepspeed_scheduler", "scheduler", "DeepSpeed's WarmupLR instead of AutoWU (no hook)",
         {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}}, autowu=False),
    Cell("pipeline", "engine", "a PipelineModule (DeepSpeed's pipeline engine)", {"zero_optimization": {"stage": 1}},
         pipeline=True, refused="AutoWU with DeepSpeed's pipeline engine (a PipelineModule) is not supported"),
)

BY_NAME = {cell.name: cell for cell in CELLS}


def markdown_table() -> str:
    """The table of docs/setups.md."""
    rows = ["| set-up | ranks tested | what happens |", "|---|---|---|"]
    for cell in CELLS:
        outcome = ("trains; AutoWU gets the step's mean loss" if cell.trains and cell.autowu else
                   "trains; DeepSpeed's scheduler, no hook" if cell.trains else f"refused: \"{cell.refused} ...\"")
        rows.append(f"| {cell.what} | {', '.join(map(str, cell.ranks))} | {outcome} |")
    return "\n".join(rows)
