package layout

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"testing"
)

func sampleHeader() *Header {
	return &Header{
		Version: Version, Flags: FlagClean, Seq: 7,
		UUID:     [16]byte{0: 0xde, 1: 0xad, 15: 0x01},
		Geometry: Geometry{Size: 64 << 20, Slots: 64, JournalBlocks: 16},
		Cipher:   CipherAES256XTS, Created: 1700000000, LastClean: 1700000100, LastOpen: 1700000050,
		VolumeKeySlot:  1,
		ProviderConfig: []byte(`{"provider":"file","key_file":"/etc/tdeshim/test.key"}`),
	}
}

func sampleSlot() *Slot {
	s := &Slot{State: SlotActive, Kind: KindRelation, Principal: 0, Tablespace: 1663, Database: 5, RelNode: 16384, Created: 1700000000, Generation: 2}
	for i := range s.Ciphertext {
		s.Ciphertext[i] = byte(i)
	}
	s.Nonce[0], s.Tag[15] = 9, 8
	return s
}

func sum(b []byte) string {
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// TestGoldenEncodings pins the bytes of every structure. A failure here
// means the on-disk format changed: bump Version, keep a reader for the
// old one, and add its golden volume under testdata/.
func TestGoldenEncodings(t *testing.T) {
	hb, err := EncodeHeader(sampleHeader())
	if err != nil {
		t.Fatal(err)
	}
	golden := map[string]struct{ got, want string }{
		"header":         {sum(hb), "c83e6da0c88f43b28098a020e53678c1bf21082fc868ce646753e676f765c7ed"},
		"slot":           {sum(EncodeSlot(3, sampleSlot())), "dd7896cc474df535bdb84bff7a9bd7e09f74fdaee22b4cf13cb5899413df8359"},
		"map page":       {sum(EncodeMapPage(2, []uint32{0, 1, 1, 5, 0, 7})), "2a8363cc5bd7fa6b0303eed7c865170ac6aa94ae87a8b78fa864337f94013891"},
		"journal super":  {sum(EncodeJournalSuper(0x1234)), "bfad487c1f3089521e56fe1e74560f44397ed84c12dbff8f0e88b997c8ce4cc0"},
		"journal record": {sum(EncodeJournalRecord(0x1234, 3, []JournalEntry{{Block: 10, Value: 1}, {Block: 1 << 33, Value: 0}})), "8a59f2af36cfb4eb5bbbf2cb60d0449248b4538c601cb5bad280f6775db92501"},
		"rekey record":   {sum(EncodeRekeyRecord(0x1234, 4, []RekeyEntry{{Block: 10, From: 1, To: 3}, {Block: 11, From: 1, To: 3}}, bytes.Repeat([]byte{0xab}, 2*BlockSize))), "aec6154f01eebf3c9d944334bbc5093814e983fbd1ac09114c77ca912a31d0e3"},
		"wrap aad":       {hex.EncodeToString(WrapAAD([16]byte{1, 2, 3}, 258)), "7464657368696d2064617461206b6579207631000102030000000000000000000000000002010000"},
	}
	for name, g := range golden {
		if g.got != g.want {
			t.Errorf("%s: %s, want %s", name, g.got, g.want)
		}
	}
}

func TestGeometryOffsets(t *testing.T) {
	g := Geometry{Size: 1 << 30, Slots: 65536, JournalBlocks: 1024}
	if g.KeyTableOff() != 8192 || g.SlotOff(1) != 8192+256 {
		t.Fatalf("key table at %d, slot 1 at %d", g.KeyTableOff(), g.SlotOff(1))
	}
	if g.JournalOff() != 8192+4096*4096 {
		t.Fatalf("journal at %d", g.JournalOff())
	}
	if g.MapPages() != (262144+1022)/1023 || g.DataOff()%DataAlign != 0 || g.DataOff() < g.MapPageOff(g.MapPages()) {
		t.Fatalf("map pages %d, data at %d", g.MapPages(), g.DataOff())
	}
	if g.BlockOff(3) != g.DataOff()+3*4096 || PageOfBlock(1023) != 1 || PageOfBlock(1022) != 0 {
		t.Fatal("block offsets")
	}
	for _, bad := range []Geometry{{Size: 4095, Slots: 4, JournalBlocks: 4}, {Size: 4096, Slots: 1, JournalBlocks: 4}, {Size: 4096, Slots: 4, JournalBlocks: 2}} {
		if bad.Validate() == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

func TestPickHeaderPrefersNewestValidCopy(t *testing.T) {
	a := sampleHeader()
	b := sampleHeader()
	b.Seq = 8
	ab, _ := EncodeHeader(a)
	bb, _ := EncodeHeader(b)
	if h, _ := PickHeader(ab, bb); h.Seq != 8 {
		t.Fatal("older copy chosen")
	}
	bb[200] ^= 1
	if h, err := PickHeader(ab, bb); err != nil || h.Seq != 7 {
		t.Fatalf("valid copy not used when the other is torn: %v", err)
	}
	ab[5] ^= 1
	if _, err := PickHeader(ab, bb); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("two bad copies: %v", err)
	}
	v := sampleHeader()
	v.Version = 2
	vb, _ := EncodeHeader(v)
	if _, err := DecodeHeader(vb); !errors.Is(err, ErrVersion) {
		t.Fatalf("future version: %v", err)
	}
}

// TestJournalSuperSurvivesTornWrite: a superblock write torn after its
// first sector (new epoch there, the old block's tail after) still
// decodes, to the new epoch.
func TestJournalSuperSurvivesTornWrite(t *testing.T) {
	old, nw := EncodeJournalSuper(41), EncodeJournalSuper(42)
	torn := append(append([]byte(nil), nw[:512]...), old[512:]...)
	if e, err := DecodeJournalSuper(torn); err != nil || e != 42 {
		t.Fatalf("torn superblock: epoch %d, %v", e, err)
	}
	bad := append([]byte(nil), nw...)
	bad[9] ^= 1
	if _, err := DecodeJournalSuper(bad); err == nil {
		t.Fatal("a damaged first sector decoded")
	}
}

func TestWALPageHeader(t *testing.T) {
	// PostgreSQL 15, timeline 1, page address 0x2000000, info XLP_LONG_HEADER.
	h := []byte{0x10, 0xD1, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	if !IsWALPageHeader(h) {
		t.Fatal("a PostgreSQL 15 WAL page header was not recognised")
	}
	for i, mut := range []func([]byte){
		func(b []byte) { b[0] = 0x11 }, // unknown magic
		func(b []byte) { b[2] = 0x10 }, // undefined info bit
		func(b []byte) { b[4] = 0 },    // timeline 0
		func(b []byte) { b[8] = 0x01 }, // unaligned page address
	} {
		b := append([]byte(nil), h...)
		mut(b)
		if IsWALPageHeader(b) {
			t.Errorf("mutation %d still recognised", i)
		}
	}
}
