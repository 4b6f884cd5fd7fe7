package pipeline

import (
	"encoding/binary"
)

// maxIFDEntries bounds the IFD0 entries looked at; real files have a few
// dozen, and the bound keeps a hostile count from costing time.
const maxIFDEntries = 512

// JPEGOrientation returns the EXIF orientation (1..8) of a JPEG, read from
// the first APP1 "Exif" segment's IFD0 tag 0x0112. It returns 1 (upright)
// when the data is not a JPEG, has no EXIF, or the tag is missing or out of
// range: a broken EXIF block never makes an image unusable. It reads only
// inside data and allocates nothing.
func JPEGOrientation(data []byte) int {
	if len(data) < 4 || data[0] != 0xFF || data[1] != 0xD8 {
		return 1
	}
	pos := 2
	for pos+4 <= len(data) {
		if data[pos] != 0xFF {
			return 1
		}
		m := data[pos+1]
		if m == 0xFF { // fill byte
			pos++
			continue
		}
		if m == 0x01 || (m >= 0xD0 && m <= 0xD8) {
			pos += 2
			continue
		}
		if m == 0xDA || m == 0xD9 { // image data: EXIF comes before it
			return 1
		}
		n := int(binary.BigEndian.Uint16(data[pos+2:]))
		if n < 2 {
			return 1
		}
		end := pos + 2 + n
		if end > len(data) {
			end = len(data)
		}
		seg := data[pos+4 : end]
		if m == 0xE1 && len(seg) >= 6 && string(seg[:6]) == "Exif\x00\x00" {
			return exifOrientation(seg[6:])
		}
		pos += 2 + n
	}
	return 1
}

// exifOrientation reads the orientation tag from a TIFF structure.
func exifOrientation(tiff []byte) int {
	if len(tiff) < 8 {
		return 1
	}
	var bo binary.ByteOrder
	switch string(tiff[:4]) {
	case "II*\x00":
		bo = binary.LittleEndian
	case "MM\x00*":
		bo = binary.BigEndian
	default:
		return 1
	}
	ifd := uint64(bo.Uint32(tiff[4:]))
	if ifd+2 > uint64(len(tiff)) {
		return 1
	}
	count := int(bo.Uint16(tiff[ifd:]))
	count = min(count, maxIFDEntries)
	for i := range count {
		e := ifd + 2 + uint64(i)*12
		if e+12 > uint64(len(tiff)) {
			return 1
		}
		entry := tiff[e : e+12]
		if bo.Uint16(entry) != 0x0112 {
			continue
		}
		// Type SHORT (3), count 1: the value sits in the first two bytes
		// of the value field.
		if bo.Uint16(entry[2:]) != 3 || bo.Uint32(entry[4:]) != 1 {
			return 1
		}
		if o := int(bo.Uint16(entry[8:])); o >= 1 && o <= 8 {
			return o
		}
		return 1
	}
	return 1
}
