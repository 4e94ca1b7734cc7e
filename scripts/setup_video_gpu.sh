#!/usr/bin/env bash
# Install the video wheels carried in .whl/ (PyAV, torchcodec CUDA build) on the GPU machine, which has no network,
# and give torchcodec FFmpeg's shared libraries: PyAV bundles them under hashed names (av.libs/libavcodec-<hash>.so.62...),
# torchcodec asks for the standard sonames (libavcodec.so.62, ...), so a folder of symlinks under the standard names
# must be on LD_LIBRARY_PATH before Python starts. Diagnostics go to stderr, the export line to stdout:
#
#   eval "$(bash scripts/setup_video_gpu.sh)"     # install, link, check torchcodec loads, set LD_LIBRARY_PATH
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
wheel_dir="${SPACESERVE_WHEEL_DIR:-$repo_root/.whl}"
link_dir="${SPACESERVE_FFMPEG_LINK_DIR:-/tmp/spaceserve-ffmpeg-libs}"
python_bin="${PYTHON:-python3}"

shopt -s nullglob
wheels=("$wheel_dir"/av-*.whl "$wheel_dir"/torchcodec-*.whl)
shopt -u nullglob
if ((${#wheels[@]} == 0)); then
    echo "no av/torchcodec wheels in $wheel_dir" >&2
    exit 1
fi
"$python_bin" -m pip install --quiet --no-index --no-deps "${wheels[@]}" >&2

av_libs="$("$python_bin" -c 'import av, os; print(os.path.join(os.path.dirname(os.path.dirname(av.__file__)), "av.libs"))')"
mkdir -p "$link_dir"
# The libraries find each other by their hashed names through $ORIGIN, which is the folder they are loaded from:
# the link folder holds every bundled library under its own name too.
for path in "$av_libs"/*.so*; do
    ln -sf "$path" "$link_dir/$(basename "$path")"
done
linked=0
for library in avutil avcodec avformat avdevice avfilter swscale swresample; do
    for path in "$av_libs"/lib"$library"-*.so.*; do
        [[ -e "$path" ]] || continue
        # libavcodec-5e6b81c2.so.62.28.102 -> libavcodec.so.62
        major="$(basename "$path" | sed -E 's/^lib[a-z]+-[0-9a-f]+\.so\.([0-9]+).*/\1/')"
        ln -sf "$path" "$link_dir/lib$library.so.$major"
        linked=$((linked + 1))
    done
done
if ((linked != 7)); then
    echo "expected 7 FFmpeg libraries in $av_libs, linked $linked" >&2
    exit 1
fi

# torchcodec's CUDA build also needs libnvrtc.so.13 and libcudart.so.13; torch's CUDA wheels carry them under
# site-packages/nvidia/.../lib, which is not on the loader's path unless torch already loaded them.
cuda_lib_dirs="$("$python_bin" - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
found = {os.path.dirname(p) for r in roots for name in ("libnvrtc.so.13", "libcudart.so.13")
         for p in glob.glob(os.path.join(r, "nvidia", "**", name), recursive=True)}
print(":".join(sorted(found)))
PY
)"
export LD_LIBRARY_PATH="$link_dir${cuda_lib_dirs:+:$cuda_lib_dirs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
"$python_bin" - >&2 <<'PY'
import av, torch, torchcodec
from torchcodec.decoders import VideoDecoder  # loads libtorchcodec_core against the linked FFmpeg
print(f"PyAV {av.__version__}, torchcodec {torchcodec.__version__}, torch {torch.__version__}, "
      f"CUDA {torch.cuda.is_available()} ({torch.cuda.device_count()} GPUs)")
PY
echo "export LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
