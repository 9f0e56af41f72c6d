#!/usr/bin/env bash
# On the GPU machine (see benchmarks/README.md): finish staging CIFAR-100 into /tmp/c100
# (parts p1/p2 copied by the two calls before) and decompress the train images once.
set -euo pipefail
cp .devdata/p3/* /tmp/c100/
cd /tmp/c100
if ls train_x.part* >/dev/null 2>&1; then cat train_x.part* > train_x.npy.xz && rm train_x.part*; fi
python3 - <<'PY'
import lzma, numpy as np, os
for s in ("train", "test"):
    if not os.path.exists(f"{s}_x.npy"):
        np.save(f"{s}_x.npy", np.load(lzma.open(f"{s}_x.npy.xz")))
        os.remove(f"{s}_x.npy.xz")
print("cifar100 staged:", sorted(os.listdir(".")))
PY
