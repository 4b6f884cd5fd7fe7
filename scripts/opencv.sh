#!/usr/bin/env bash
# opencv.sh PREFIX: builds the OpenCV that the images ship, from Debian 12's
# own source package (the one its libopencv*406 packages are built from,
# with Debian's patches), configured with only what infer-server uses.
#
# Debian's OpenCV runtime closure is about 320 MB of shared libraries
# (GDAL through imgcodecs, ffmpeg through videoio, Qt and Mesa through
# highgui, VTK, OpenEXR, TBB, LAPACK): the server reads JPEG, PNG, WebP
# and BMP and runs OpenCV DNN on the CPU, and needs none of it. This build
# has the modules gocv's package compiles against (core, imgproc,
# imgcodecs, dnn, and highgui, videoio, video, photo, features2d, calib3d,
# objdetect, flann, which the server links but does not call), no GUI, no
# video backends, no OpenCL, and the codecs JPEG (libjpeg-turbo), PNG,
# WebP and BMP. It needs libjpeg62-turbo, libpng16-16, libwebp7 and
# libprotobuf32 at run time: 23 MB in all, against Debian's 320.
#
# The source: the .dsc named by OPENCV_DEBIAN_SOURCE in versions.env,
# sha256-checked against OPENCV_DSC_SHA256; dpkg-source checks the
# tarballs against the .dsc. They come from Debian's pool, which keeps a
# version while a bookworm suite ships it: when a point release replaces
# it, set both values to the new .dsc (DEBIAN_POOL may name a mirror). Build dependencies (the Dockerfile's opencv
# stage installs them): cmake, ninja-build, dpkg-dev, curl, g++,
# libjpeg62-turbo-dev, libpng-dev, libwebp-dev, libprotobuf-dev,
# protobuf-compiler, zlib1g-dev.
#
# PREFIX/lib gets the libraries and PREFIX/lib/pkgconfig/opencv4.pc, for
# gocv (PKG_CONFIG_PATH). It takes about 7 minutes on 2 cores.
set -euo pipefail
prefix=${1:?usage: opencv.sh PREFIX}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=versions.env
. "$root/scripts/versions.env"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
pool=${DEBIAN_POOL:-http://deb.debian.org/debian/pool/main/o/opencv}
dsc=opencv_${OPENCV_DEBIAN_SOURCE}.dsc
echo "opencv: fetching $dsc and its tarballs from $pool" >&2
curl -fsSLO "$pool/$dsc"
echo "$OPENCV_DSC_SHA256  $dsc" | sha256sum -c --quiet - ||
	{ echo "opencv: $dsc does not match OPENCV_DSC_SHA256" >&2; exit 1; }
# The files the .dsc lists, each checked by dpkg-source against it.
for f in $(awk '/^Checksums-Sha256:/{on=1; next} /^[^ ]/{on=0} on{print $3}' "$dsc"); do
	curl -fsSLO "$pool/$f"
done
dpkg-source --no-check -x "$dsc" src > dpkg-source.log 2>&1 || { cat dpkg-source.log >&2; exit 1; }

flags=(
	-G Ninja -S src -B build
	-DCMAKE_BUILD_TYPE=Release
	-DCMAKE_INSTALL_PREFIX="$prefix" -DCMAKE_INSTALL_LIBDIR=lib
	-DBUILD_LIST=core,imgproc,imgcodecs,dnn,videoio,highgui,video,objdetect,features2d,calib3d,photo,flann
	-DBUILD_SHARED_LIBS=ON -DOPENCV_GENERATE_PKGCONFIG=ON
	-DBUILD_TESTS=OFF -DBUILD_PERF_TESTS=OFF -DBUILD_EXAMPLES=OFF -DBUILD_opencv_apps=OFF -DBUILD_DOCS=OFF
	-DBUILD_JAVA=OFF -DBUILD_opencv_python2=OFF -DBUILD_opencv_python3=OFF
	-DENABLE_PRECOMPILED_HEADERS=OFF -DBUILD_INFO_SKIP_TIMESTAMP=ON
	# Nothing downloaded at configure time (Debian's source has no 3rdparty/).
	-DOPENCV_DOWNLOAD_TRIES_LIST= -DWITH_IPP=OFF -DWITH_ITT=OFF -DWITH_ADE=OFF -DWITH_CAROTENE=OFF
	# DNN on the CPU, with Debian's protobuf as Debian builds it.
	-DWITH_PROTOBUF=ON -DBUILD_PROTOBUF=OFF -DPROTOBUF_UPDATE_FILES=ON
	-DWITH_OPENCL=OFF -DWITH_CUDA=OFF -DWITH_VULKAN=OFF -DWITH_HALIDE=OFF -DWITH_NGRAPH=OFF -DWITH_ONNX=OFF
	-DWITH_WEBNN=OFF -DWITH_TIMVX=OFF -DWITH_EIGEN=OFF -DWITH_LAPACK=OFF -DWITH_TBB=OFF -DWITH_OPENMP=OFF
	# The codecs the server reads; BMP is OpenCV's own.
	-DWITH_JPEG=ON -DWITH_PNG=ON -DWITH_WEBP=ON
	-DWITH_TIFF=OFF -DWITH_OPENEXR=OFF -DWITH_OPENJPEG=OFF -DWITH_JASPER=OFF -DWITH_GDAL=OFF -DWITH_GDCM=OFF
	-DWITH_IMGCODEC_HDR=OFF -DWITH_IMGCODEC_SUNRASTER=OFF -DWITH_IMGCODEC_PXM=OFF -DWITH_IMGCODEC_PFM=OFF
	# No GUI and no video backends: the server decodes still images.
	-DWITH_GTK=OFF -DWITH_QT=OFF -DWITH_OPENGL=OFF -DWITH_VTK=OFF
	-DWITH_FFMPEG=OFF -DWITH_GSTREAMER=OFF -DWITH_V4L=OFF -DWITH_1394=OFF -DWITH_GPHOTO2=OFF -DWITH_PVAPI=OFF
	-DWITH_VA=OFF -DWITH_VA_INTEL=OFF -DWITH_OBSENSOR=OFF -DWITH_QUIRC=OFF
)
cmake "${flags[@]}" > cmake.log 2>&1 || { tail -40 cmake.log >&2; exit 1; }
grep -E 'To be built|JPEG:|PNG:|WEBP:|Protobuf:|Parallel framework' cmake.log >&2 || true
echo "opencv: building (minutes)" >&2
cmake --build build -j "$(nproc)" > build.log 2>&1 || { tail -40 build.log >&2; exit 1; }
cmake --install build > install.log 2>&1 || { tail -20 install.log >&2; exit 1; }
have=$(PKG_CONFIG_PATH=$prefix/lib/pkgconfig pkg-config --modversion opencv4)
[ "$have" = "$OPENCV_VERSION" ] || { echo "opencv: built $have, want $OPENCV_VERSION" >&2; exit 1; }
echo "opencv: $have in $prefix ($(du -sh "$prefix/lib" | cut -f1))" >&2
