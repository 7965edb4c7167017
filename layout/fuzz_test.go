package layout

import (
	"bytes"
	"testing"
)

// Every decoder takes bytes from disk, which may be anything. None may
// panic, and whatever one accepts must re-encode to something it accepts
// with the same meaning.

func FuzzDecodeHeader(f *testing.F) {
	h := sampleHeader()
	b, _ := EncodeHeader(h)
	f.Add(b)
	f.Add(make([]byte, BlockSize))
	f.Add(b[:100])
	f.Fuzz(func(t *testing.T, in []byte) {
		if len(in) < BlockSize {
			in = append(in, make([]byte, BlockSize-len(in))...)
		}
		h, err := DecodeHeader(in)
		if err != nil {
			return
		}
		out, err := EncodeHeader(h)
		if err != nil {
			t.Fatalf("accepted header does not re-encode: %v", err)
		}
		h2, err := DecodeHeader(out)
		if err != nil || h2.Geometry != h.Geometry || h2.Seq != h.Seq || !bytes.Equal(h2.ProviderConfig, h.ProviderConfig) {
			t.Fatalf("re-encoded header differs: %v", err)
		}
	})
}

func FuzzDecodeSlot(f *testing.F) {
	f.Add(uint32(1), EncodeSlot(1, sampleSlot()))
	f.Add(uint32(3), make([]byte, SlotSize))
	f.Fuzz(func(t *testing.T, n uint32, in []byte) {
		s, err := DecodeSlot(n, in)
		if err != nil || s.State == SlotEmpty {
			return
		}
		if s2, err := DecodeSlot(n, EncodeSlot(n, s)); err != nil || *s2 != *s {
			t.Fatalf("slot round trip: %v", err)
		}
	})
}

func FuzzDecodeMapPage(f *testing.F) {
	f.Add(uint64(0), EncodeMapPage(0, []uint32{1, 2, 3}))
	f.Add(uint64(9), make([]byte, BlockSize))
	f.Fuzz(func(t *testing.T, p uint64, in []byte) {
		if len(in) < BlockSize {
			in = append(in, make([]byte, BlockSize-len(in))...)
		}
		e := make([]uint32, EntriesPerPage)
		if err := DecodeMapPage(p, in, e); err != nil {
			return
		}
		e2 := make([]uint32, EntriesPerPage)
		if err := DecodeMapPage(p, EncodeMapPage(p, e), e2); err != nil {
			t.Fatalf("map page round trip: %v", err)
		}
	})
}

func FuzzDecodeJournal(f *testing.F) {
	f.Add(EncodeJournalRecord(5, 0, []JournalEntry{{1, 2}, {3, 0}}))
	f.Add(EncodeJournalSuper(77))
	f.Add([]byte("TDJREC\x00\x00garbage"))
	f.Fuzz(func(t *testing.T, in []byte) {
		DecodeJournalSuper(in)
		ri, ents, err := DecodeJournalRecord(in)
		if err != nil {
			return
		}
		again := EncodeJournalRecord(ri.Epoch, ri.Seq, ents)
		if _, ents2, err := DecodeJournalRecord(again); err != nil || len(ents2) != len(ents) {
			t.Fatalf("journal record round trip: %v", err)
		}
	})
}

func FuzzDecodeRekeyRecord(f *testing.F) {
	f.Add(EncodeRekeyRecord(5, 1, []RekeyEntry{{Block: 7, From: 1, To: 2}}, make([]byte, BlockSize)))
	f.Add([]byte("TDJRKEY\x00garbage"))
	f.Fuzz(func(t *testing.T, in []byte) {
		ri, ents, data, err := DecodeRekeyRecord(in)
		if err != nil {
			return
		}
		if len(data) != len(ents)*BlockSize {
			t.Fatalf("rekey record: %d entries but %d data bytes", len(ents), len(data))
		}
		again := EncodeRekeyRecord(ri.Epoch, ri.Seq, ents, data)
		if _, ents2, data2, err := DecodeRekeyRecord(again); err != nil || len(ents2) != len(ents) || !bytes.Equal(data2, data) {
			t.Fatalf("rekey record round trip: %v", err)
		}
	})
}

func FuzzWALPageHeader(f *testing.F) {
	f.Add([]byte{0x10, 0xD1, 0x05, 0, 1, 0, 0, 0, 0, 0x20, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		if IsWALPageHeader(in) && (len(in) < 24 || in[0]&0 != 0) {
			t.Fatal("accepted a header shorter than 24 bytes")
		}
	})
}
