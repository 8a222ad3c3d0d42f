package fsm

import "time"

// Probe is a log entry that changes no fact: `droverctl cluster probe`
// proposes probes to measure how fast the store commits (latency and
// commands per second) on the live cluster. Result: nil.
type Probe struct {
	Machine string    `json:"machine"` // the machine that proposed it
	Seq     uint64    `json:"seq"`     // its number in that machine's run
	At      time.Time `json:"at"`
}

// Type implements Command.
func (Probe) Type() CommandType { return CmdProbe }

func (s *State) probe(c Probe) (any, *RuleError) {
	if c.Machine == "" {
		return nil, ruleErr(ErrInvalid, "probe %d: no machine given", c.Seq)
	}
	return nil, nil
}
