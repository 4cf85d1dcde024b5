"""Item 4 of issue 10: materialising a convolution by scattering its kernel instead of
applying it in float64 to identity batches (what ``dense_chain`` does through
``LinearMap.to_dense`` for resnet18's layer4 convolutions, 512 channels on 2x2 maps).
Run: OMP_NUM_THREADS=1 .venv/bin/python docs/design/issue10/prototypes/conv_materialise.py"""

import time

import torch
import torch.nn.functional as F

torch.set_num_threads(1)
w = torch.randn(512, 512, 3, 3, dtype=torch.float64)
x = torch.eye(2048, dtype=torch.float64).reshape(2048, 512, 2, 2)
t = time.process_time()
y = F.conv2d(x, w, padding=1)
print("float64 conv2d on the identity (2048 columns):", time.process_time() - t, "s")
t = time.process_time()
A = torch.zeros(512, 2, 2, 512, 2, 2, dtype=torch.float64)
for qi in range(2):  # A[(o, q), (c, p)] = w[o, c, p - q + pad]
    for qj in range(2):
        for pi in range(2):
            for pj in range(2):
                A[:, qi, qj, :, pi, pj] = w[:, :, pi - qi + 1, pj - qj + 1]
A = A.reshape(2048, 2048)
print(
    "scatter of the kernel:",
    time.process_time() - t,
    "s; max |difference|:",
    float((A - y.reshape(2048, 2048).T).abs().max()),
)
