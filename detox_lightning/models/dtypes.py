"""The dtype names a user may give for base weights, and the torch dtypes they stand for.

One table for the policy (`policy.dtype`), the merged export (`--dtype`) and the benchmark
(`--dtype`), so a name accepted by one is accepted by all.
"""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
