package volume_test

import (
	"context"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/tdeshim/tdeshim/keys"
	"github.com/tdeshim/tdeshim/kmipdev"
	"github.com/tdeshim/tdeshim/layout"
	"github.com/tdeshim/tdeshim/store"
	"github.com/tdeshim/tdeshim/volume"
)

// BenchmarkOpen10kKeys measures opening a volume whose key table holds
// 10 000 wrapped data keys (a cluster with many relations), with the
// principal key in a KMIP server: wrap=local (one Get, then local AES-GCM)
// and wrap=server (KMIP Decrypt, 100 per batch). The slots are written
// with local wrapping, which produces the same blob as server wrapping.
func BenchmarkOpen10kKeys(b *testing.B) {
	slog.SetDefault(slog.New(slog.NewTextHandler(io.Discard, nil)))
	const nkeys = 10000
	kms, err := kmipdev.Start(b.TempDir(), "127.0.0.1:0", nil)
	if err != nil {
		b.Fatal(err)
	}
	defer kms.Close()
	ctx := context.Background()
	set := keys.KMIPSettings{Endpoints: []string{kms.Addr}, CA: kms.Certs.CA, Cert: kms.Certs.ClientCert, Key: kms.Certs.ClientKey,
		Principal: "bench", Wrap: keys.WrapLocal}
	local, err := keys.OpenKMIP(ctx, set, true)
	if err != nil {
		b.Fatal(err)
	}
	geo := layout.Geometry{Size: 64 << 20, Slots: nkeys + 2, JournalBlocks: 16}
	st := store.NewCrash(make([]byte, geo.BackingSize()), 4096)
	if err := volume.Create(ctx, st, geo, local, nil); err != nil {
		b.Fatal(err)
	}
	h, _ := volume.ReadHeader(st)
	for i := uint32(2); i < nkeys+1; i++ {
		k, _ := keys.RandomSecret(64)
		w, err := local.Wrap(ctx, k, layout.WrapAAD(h.UUID, i))
		k.Wipe()
		if err != nil {
			b.Fatal(err)
		}
		sl := layout.Slot{State: layout.SlotActive, Kind: layout.KindRelation, Database: 5, RelNode: 16384 + i, Nonce: w.Nonce, Ciphertext: w.Ciphertext, Tag: w.Tag}
		st.WriteAt(layout.EncodeSlot(i, &sl), geo.SlotOff(i))
	}
	st.Sync()
	img := st.Image()
	resolved := local.Settings()
	local.Close()
	for _, mode := range []string{keys.WrapLocal, keys.WrapServer} {
		b.Run(mode, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				s := resolved
				s.Wrap = mode
				start := time.Now()
				p, err := keys.OpenKMIP(ctx, s, false)
				if err != nil {
					b.Fatal(err)
				}
				v, err := volume.Open(ctx, store.NewCrash(img, 4096), volume.Options{Provider: p, ReadOnly: true})
				if err != nil {
					b.Fatal(err)
				}
				b.ReportMetric(time.Since(start).Seconds(), "s/open")
				v.Close()
			}
		})
	}
}
