export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 60 python3 benchmarks/gemv_profile.py 2>&1 | grep -v -i warn | tee $OUT/profile.txt
(timeout 100 python3 -m pytest -q -m gpu tests/gpu/test_kernels_gpu.py -k "gemv or compact or select" 2>&1 | tail -4) > $OUT/tests.txt 2>&1; cat $OUT/tests.txt
timeout 150 python3 benchmarks/sparse_gemv.py 2>&1 | tee $OUT/sparse.txt
timeout 120 python3 benchmarks/ternary_gemv.py 2>&1 | tee $OUT/ternary.txt
timeout 100 python3 benchmarks/decode.py --batch 1 2>&1 | tee $OUT/decode.txt | tail -8
