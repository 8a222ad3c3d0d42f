package migrate

import (
	"slices"
	"testing"
)

// The target's staging and undo decisions, one volume at a time: what a
// copy in place, a staging copy and a kept base turn into.
func TestPlaceAndUndoCopyDecisions(t *testing.T) {
	c := newCluster(t, "a", "b")
	b := c.m["b"]
	vols := b.vols
	final, staging := vols.Dataset("shop", "data"), vols.StagingDataset("m1", "data")
	for _, tc := range []struct {
		name             string
		haveFinal        bool // a copy in place before (kept from an older move)
		haveStaging      bool
		hadBase          bool // the staging copy was made from the kept one
		markedBefore     string
		afterPlace       []string // datasets after placeCopy
		afterUndo        []string // datasets after undoCopy (from the start)
		originAfterPlace string
	}{
		{name: "fresh copy", haveStaging: true, afterPlace: []string{final}, afterUndo: nil, originAfterPlace: "m1"},
		{name: "stale copy superseded", haveFinal: true, haveStaging: true, afterPlace: []string{final}, afterUndo: []string{final}, originAfterPlace: "m1"},
		{name: "base taken from the kept copy", haveStaging: true, hadBase: true, afterPlace: []string{final}, afterUndo: []string{final}, originAfterPlace: "m1"},
		{name: "already placed, marked ours", haveFinal: true, markedBefore: "m1", afterPlace: []string{final}, afterUndo: nil, originAfterPlace: "m1"},
		{name: "placed copy of another move", haveFinal: true, markedBefore: "m0", afterPlace: []string{final}, afterUndo: []string{final}, originAfterPlace: "m1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			setup := func() {
				for _, n := range vols.names() {
					vols.DestroyDataset(n)
				}
				if tc.haveFinal {
					vols.create(final, "drover-m0-final")
					vols.SetOrigin("shop", "data", tc.markedBefore)
				}
				if tc.haveStaging {
					vols.create(staging, "drover-m1-1")
				}
			}
			setup()
			if _, err := b.mig.placeCopy("m1", "shop", "data"); err != nil {
				t.Fatalf("placing: %v", err)
			}
			if got := vols.names(); !slices.Equal(got, tc.afterPlace) || vols.Origin("shop", "data") != tc.originAfterPlace {
				t.Fatalf("after placing: %v marked %q", got, vols.Origin("shop", "data"))
			}
			setup()
			if err := b.mig.undoCopy("m1", "shop", "data", tc.hadBase); err != nil {
				t.Fatalf("undoing: %v", err)
			}
			if got := vols.names(); !slices.Equal(got, tc.afterUndo) {
				t.Fatalf("after undoing: %v, want %v", got, tc.afterUndo)
			}
		})
	}
}
