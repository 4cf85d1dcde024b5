"""Issue 10 (H1b): ``banded_gram.conv_matrix`` (kernel scattered) against the float64
convolution of identity batches (``LinearMap.to_dense``, what ``dense_chain`` did) on resnet18's
layer4 convolution (512 channels on 2×2 maps) and layer4.0.conv1 (256→512, stride 2, 4×4 → 2×2).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/h1b_conv_matrix.py"""

import os
import time

import torch

from lipreg.functional.banded_gram import conv_linear_map, conv_matrix
from lipreg.functional.specs import ConvData

torch.set_num_threads(1)
print("load", os.getloadavg())
for c_in, c_out, n, s in ((512, 512, 2, 1), (256, 512, 4, 2)):
    w = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64)
    conv = ConvData(w, (s, s), (1, 1), (1, 1), 1, (c_in, n, n))
    t = time.process_time()
    dense = conv_linear_map(conv).to_dense(batch_size=256)
    t_dense = time.process_time() - t
    t = time.process_time()
    scattered = conv_matrix(conv)
    t_scatter = time.process_time() - t
    print(
        f"{c_in}->{c_out} on {n}x{n} stride {s}: to_dense {t_dense:.3f} s, conv_matrix "
        f"{t_scatter:.4f} s, identical: {torch.equal(dense, scattered)}"
    )
