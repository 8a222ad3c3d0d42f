package factview

import (
	"errors"
	"testing"

	"github.com/drover-sh/drover/agent/ctlapi"
	"github.com/drover-sh/drover/internal/facttest"
)

func TestLookups(t *testing.T) {
	st := facttest.NewStore()
	st.AddMachine(t, "id-a", "alpha")
	st.AddMachine(t, "id-b", "beta")
	g := facttest.NewMembers("id-a", "alpha-renamed")
	if m, err := MachineByName(st, "id-b", "self"); err != nil || m.Name != "beta" {
		t.Fatalf("self: %+v %v", m, err)
	}
	var apiErr *ctlapi.APIError
	if _, err := MachineByName(st, "id-b", "gamma"); !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeUnknownMachine {
		t.Fatalf("unknown machine: %v", err)
	}
	if NameOf(g, st, "id-a") != "alpha-renamed" || NameOf(g, st, "id-b") != "beta" || NameOf(g, st, "zz") != "zz" || NameOf(g, st, "") != "" {
		t.Fatal("names: gossip first, then facts, then the id")
	}
	if ns, name, err := SplitService("shop/web"); err != nil || ns != "shop" || name != "web" {
		t.Fatalf("split: %s %s %v", ns, name, err)
	}
	if _, _, err := SplitService("shopweb"); !errors.As(err, &apiErr) || apiErr.Code != ctlapi.CodeBadRequest {
		t.Fatalf("split without a slash: %v", err)
	}
}
