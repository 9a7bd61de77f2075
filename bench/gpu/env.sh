# Sourced on the GPU machine: points ditto at NVIDIA's libraries and headers where PyTorch's
# wheels put them (nvidia/cu13/lib: cublasLt, nvrtc; nvidia/nccl/lib), beside the driver's
# libcuda that the loader already finds. Prints what it found.
SITE=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
libdirs=""
for pattern in 'libcublasLt.so*' 'libnvrtc.so*' 'libnccl.so*'; do
    f=$(find "$SITE/nvidia" /usr/local/cuda/lib64 -name "$pattern" 2>/dev/null | sort | head -1)
    [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvrtc=$(find "$SITE/nvidia" -name 'libnvrtc.so.1[0-9]*' 2>/dev/null | grep -v builtins | sort | head -1)
[ -n "$nvrtc" ] && export DITTO_NVRTC_LIB="$nvrtc"
hdr=$(find "$SITE/nvidia" /usr/local/cuda/include -name cuda_bf16.h 2>/dev/null | head -1)
[ -n "$hdr" ] && export DITTO_CUDA_INCLUDE="$(dirname "$hdr")"
export DITTO_KERNEL_CACHE=${DITTO_KERNEL_CACHE:-/tmp/ditto-kernels}
echo "env: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
echo "env: DITTO_NVRTC_LIB=${DITTO_NVRTC_LIB:-unset} DITTO_CUDA_INCLUDE=${DITTO_CUDA_INCLUDE:-unset}"
