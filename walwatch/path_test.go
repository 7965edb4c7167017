package walwatch

import (
	"context"
	"encoding/binary"
	"testing"

	"github.com/tdeshim/tdeshim/layout"
)

func rel(spc, db, rn uint32, fork uint8, seg uint32) layout.Owner {
	return layout.Owner{Kind: layout.KindRelation, Rel: layout.RelKey{Tablespace: spc, Database: db, RelNode: rn}, Fork: fork, Segment: seg}
}

func TestParsePath(t *testing.T) {
	vol := layout.Owner{Kind: layout.KindVolume}
	wal := layout.Owner{Kind: layout.KindWAL}
	for path, want := range map[string]layout.Owner{
		"base/5/16384":                            rel(1663, 5, 16384, layout.ForkMain, 0),
		"base/5/16384.3":                          rel(1663, 5, 16384, layout.ForkMain, 3),
		"base/5/16384_fsm":                        rel(1663, 5, 16384, layout.ForkFSM, 0),
		"base/5/16384_vm":                         rel(1663, 5, 16384, layout.ForkVM, 0),
		"base/5/16384_init":                       rel(1663, 5, 16384, layout.ForkInit, 0),
		"base/16401/2619_fsm.1":                   rel(1663, 16401, 2619, layout.ForkFSM, 1),
		"global/1262":                             rel(1664, 0, 1262, layout.ForkMain, 0),
		"pg_tblspc/16500/PG_15_202209061/5/16600": rel(16500, 5, 16600, layout.ForkMain, 0),
		"pg_wal/000000010000000000000001":         wal,
		"pg_wal/000000020000000A000000FF.partial": wal,
		"pg_wal/xlogtemp.4242":                    wal,
		"base/5/t3_16384":                         vol, // temporary relation
		"base/5/pg_filenode.map":                  vol,
		"base/5/PG_VERSION":                       vol,
		"base/5/pg_internal.init":                 vol,
		"global/pg_control":                       vol,
		"base/5/016384":                           vol,
		"base/5/16384_xyz":                        vol,
		"base/5/16384.":                           vol,
		"base/x/16384":                            vol,
		"base/5/99999999999":                      vol, // > 2^32
		"pg_wal/archive_status/000000010000000000000001.done": vol,
		"pg_wal/00000001000000000000000":                      vol,
		"pg_xact/0000":                                        vol,
		"postgresql.conf":                                     vol,
	} {
		if got := ParsePath(path); got != want {
			t.Errorf("%s: %+v, want %+v", path, got, want)
		}
	}
}

// FuzzParsePath: any name classifies without panicking, and a relation
// it finds has a relfilenode and names its fork and segment back.
func FuzzParsePath(f *testing.F) {
	for _, s := range []string{"base/5/16384_vm.2", "global/1262", "pg_wal/000000010000000000000001", "pg_tblspc/1/PG_15_1/2/3"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, p string) {
		o := ParsePath(p)
		if o.Kind == layout.KindRelation && (o.Rel.RelNode == 0 || o.Fork > layout.ForkInit) {
			t.Fatalf("%q: %+v", p, o)
		}
	})
}

// fakeVolume satisfies Volume for parser tests; it holds no data.
type fakeVolume struct{}

func (fakeVolume) ReadAt(p []byte, off int64) error                          { clear(p); return nil }
func (fakeVolume) EnsureRelationKeys(context.Context, []layout.RelKey) error { return nil }
func (fakeVolume) EnsureWALKey(context.Context) (uint32, error)              { return 1, nil }
func (fakeVolume) RelationKeys() map[layout.RelKey]uint32                    { return nil }
func (fakeVolume) Retire(context.Context, uint32, bool) error                { return nil }
func (fakeVolume) SetIndex(*layout.Index)                                    {}
func (fakeVolume) Size() int64                                               { return 1 << 30 }

// FuzzInotifyEvents: whatever bytes the inotify read returns, the event
// parser neither panics nor reads past the buffer.
func FuzzInotifyEvents(f *testing.F) {
	ev := make([]byte, 16+8)
	binary.LittleEndian.PutUint32(ev[0:], 1)
	binary.LittleEndian.PutUint32(ev[4:], 0x100) // IN_CREATE
	binary.LittleEndian.PutUint32(ev[12:], 8)
	copy(ev[16:], "16384\x00\x00\x00")
	f.Add(ev)
	f.Add([]byte{1, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f})
	f.Fuzz(func(t *testing.T, b []byte) {
		w := New(Config{Mount: "/nonexistent", Volume: fakeVolume{}})
		tr := &tree{w: w, fd: -1, wds: map[int32]string{1: "/nonexistent/base/5"}, dirty: map[string]struct{}{}, needKey: map[string]struct{}{}, mapped: map[string][2]int64{}}
		tr.events(b)
	})
}
