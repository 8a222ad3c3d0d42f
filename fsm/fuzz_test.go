package fsm

import (
	"bytes"
	"encoding/json"
	"errors"
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

// FuzzReadSnapshot feeds arbitrary bytes to snapshot restore: it never
// panics, and a snapshot it accepts writes back to one it reads the same.
func FuzzReadSnapshot(f *testing.F) {
	s := NewState()
	for _, c := range history() {
		s.ApplyCommand(c)
	}
	var good bytes.Buffer
	if err := s.WriteSnapshot(&good); err != nil {
		f.Fatal(err)
	}
	f.Add(good.Bytes())
	f.Add(good.Bytes()[:len(good.Bytes())/2])
	f.Add([]byte("DRVR"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := ReadSnapshot(bytes.NewReader(b))
		if err != nil {
			if !errors.Is(err, ErrBadSnapshot) {
				t.Fatalf("refused without ErrBadSnapshot: %v", err)
			}
			return
		}
		var again bytes.Buffer
		if err := st.WriteSnapshot(&again); err != nil {
			t.Fatalf("writing back an accepted snapshot: %v", err)
		}
		if _, err := ReadSnapshot(&again); err != nil {
			t.Fatalf("an accepted snapshot written back does not read: %v", err)
		}
	})
}
