package fsm

import (
	"encoding/json"
	"reflect"
	"testing"
)

func jsonRoundTrip(e *RuleError) (*RuleError, error) {
	b, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	var out RuleError
	err = json.Unmarshal(b, &out)
	return &out, err
}

// FuzzDecode feeds arbitrary bytes to the decoder: it never panics, what
// it accepts re-encodes to the same command, and applying it to a state
// never panics.
func FuzzDecode(f *testing.F) {
	for _, c := range history() {
		b, err := Encode(c)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Add([]byte{})
	f.Add([]byte{255, '{', '}'})
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := Decode(in)
		if err != nil {
			return
		}
		again, err := Encode(c)
		if err != nil {
			t.Fatalf("decoded %#v does not encode: %v", c, err)
		}
		c2, err := Decode(again)
		if err != nil || !reflect.DeepEqual(c, c2) {
			t.Fatalf("round trip changed %#v into %#v (%v)", c, c2, err)
		}
		s := NewState()
		for _, h := range history()[:5] {
			s.ApplyCommand(h)
		}
		s.ApplyCommand(c)
	})
}
