export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 120 python3 benchmarks/decode.py --batch 1 2>&1 | tee $OUT/decode.txt | tail -8
(timeout 330 python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py 2>&1 | tail -6) > $OUT/tests.txt 2>&1; cat $OUT/tests.txt
