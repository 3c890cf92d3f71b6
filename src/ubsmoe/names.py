"""The allowed names of every registry and choice, in plain Python: the one place each list lives.

The configuration check (:mod:`ubsmoe.validate`) reads the names from here without
importing torch, Flower or the data loaders; each registry (strategies, backends, server
optimizers, schedules, backbone adapters, benchmarks, ...) is keyed by the same names,
and ``tests/test_layering.py`` checks that every registry has exactly the names listed
here. Adding a method, a backend or an optimizer adds its name here once.
"""

from __future__ import annotations

# method.name: the federated methods (ubsmoe.fl.strategies.STRATEGIES)
METHODS = ("ubsmoe", "smoe", "smoe_llb", "flame", "fedit", "hetlora", "flexlora", "flora", "florist")
# backend.name and backend.mode (ubsmoe.fl.backends.BACKENDS, ubsmoe.fl.backends.flower.HOSTS)
BACKENDS = ("local", "flower")
FLOWER_MODES = ("simulation", "deployment", "inprocess")
# server.optimizer (ubsmoe.fl.server_optim.SERVER_OPTIMIZERS)
SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
# optim.name and optim.schedule (ubsmoe.fl.schedule.SCHEDULES)
CLIENT_OPTIMIZERS = ("adamw",)
SCHEDULES = ("constant", "cosine", "step")
SCHEDULES_NEEDING_TOTAL_ROUNDS = ("cosine",)
# federation.faults.<kind> (ubsmoe.fl.faults.FaultInjection)
FAULT_KINDS = ("fail", "nonfinite", "bad_shape", "straggler", "byzantine")
# federation.faults.byzantine_mode (ubsmoe.fl.faults.POISONINGS)
BYZANTINE_MODES = ("scale", "sign_flip", "noise")
# server.aggregator (ubsmoe.fl.aggregators.AGGREGATORS)
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum")
# privacy.dp (ubsmoe.privacy.dp) and the methods it runs on: those whose server step is an
# average of the clients' states (ubsmoe.validate refuses the others under DP)
DP_MODES = ("none", "fixed", "adaptive")
DP_METHODS = ("ubsmoe", "smoe", "smoe_llb", "flame", "fedit")
# federation.partition (ubsmoe.data.partition)
PARTITIONS = ("dirichlet", "iid")
# model.adapter (ubsmoe.backbones.ADAPTERS) and data.kind (ubsmoe.assembly.RUN_KINDS)
ADAPTERS = ("moefy", "native")
DATA_KINDS = ("glue", "commonsense")
# model.* of the moefy adapter (ubsmoe.tasks.classification, ubsmoe.smoe.moefy)
POOLINGS = ("mean", "cls")
ROUTER_INITS = ("centroid", "zeros", "fitted")
MOEFY_METHODS = ("weights", "coactivation")
# model.* of the native adapter
MODEL_DTYPES = ("float32", "bfloat16", "float16")
EXPERT_KERNELS = ("auto", "grouped", "loop")  # model.expert_kernel (ubsmoe.smoe.native_kernels.products_class)
GATE_NORMS = ("model", "renormalize")  # model.gate_norm (ubsmoe.smoe.native_layer)
# data.* of data.kind=commonsense (ubsmoe.data.commonsense.BENCHMARKS, ubsmoe.tasks.instruction)
BENCHMARKS = ("boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy", "ARC-Challenge", "openbookqa")
EVAL_MODES = ("likelihood", "generation", "both")
PROMPT_TEMPLATES = ("alpaca", "llm_adapters")  # data.prompt_template (ubsmoe.data.instruction_format.TEMPLATES)
PARTITION_BY = ("source", "answer")
# logger.* and fabric.*
LOGGERS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")
ACCELERATORS = ("cpu", "cuda", "mps", "auto")
PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-mixed", "64-true")
