package server

import (
	"encoding/binary"
	"math"
	"unsafe"
)

// nativeLittleEndian: raw tensors travel little-endian, so on such a host
// (every one Go serves on amd64 and arm64) they are reinterpreted in place
// rather than converted value by value.
var nativeLittleEndian = binary.NativeEndian.Uint16([]byte{1, 0}) == 1

// floatsFromLE views little-endian float32 bytes as []float32 without a
// copy when the host is little-endian and the bytes are 4-aligned;
// otherwise it converts into a new slice. The result may alias raw.
func floatsFromLE(raw []byte) []float32 {
	n := len(raw) / 4
	if n == 0 {
		return nil
	}
	if nativeLittleEndian && uintptr(unsafe.Pointer(&raw[0]))%4 == 0 {
		return unsafe.Slice((*float32)(unsafe.Pointer(&raw[0])), n)
	}
	out := make([]float32, n)
	for i := range out {
		out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
	}
	return out
}

// floatsToLE gives the little-endian bytes of f, aliasing f on a
// little-endian host: f must not change while the bytes are in use.
func floatsToLE(f []float32) []byte {
	if len(f) == 0 {
		return []byte{}
	}
	if nativeLittleEndian {
		return unsafe.Slice((*byte)(unsafe.Pointer(&f[0])), 4*len(f))
	}
	b := make([]byte, 4*len(f))
	for i, v := range f {
		binary.LittleEndian.PutUint32(b[4*i:], math.Float32bits(v))
	}
	return b
}
