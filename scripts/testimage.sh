#!/usr/bin/env bash
# testimage.sh NAME DIR: prints the path of a photo for the container and
# Kubernetes tests: ../shared/testdata/images/NAME.jpg where the shared
# test data is, or else a 64×48 gradient BMP written into DIR (any image
# the models accept will do for those tests).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
photo=$root/../shared/testdata/images/$1.jpg
if [ -f "$photo" ]; then
	echo "$photo"
	exit 0
fi
out=$2/gradient.bmp
python3 -c 'import struct,sys; w,h=64,48; row=bytes(v for x in range(w) for v in (x*4,128,255-x*4)); d=row*h
sys.stdout.buffer.write(b"BM"+struct.pack("<IHHI",54+len(d),0,0,54)+struct.pack("<IiiHHIIiiII",40,w,h,1,24,0,len(d),2835,2835,0,0)+d)' > "$out"
echo "$out"
