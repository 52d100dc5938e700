//! Interoperability with real Python PEFT: the merged adapters must load in
//! `PeftModel.from_pretrained` with no missing or unexpected keys, and PEFT's
//! own delta computation must agree with what we promise (exact: the weighted
//! sum of the inputs' deltas; svd: the optimal rank-N error; linear: PEFT's
//! own add_weighted_adapter). The checks live in tests/python/peft_interop.py;
//! this test runs it against the binary cargo just built.

mod common;

#[test]
fn peft_loads_and_agrees_with_our_merges() {
    let out = common::run_script(
        "tests/python/peft_interop.py",
        &[],
        env!("CARGO_BIN_EXE_lora-merge"),
    );
    common::assert_oracle_passed(&out, "PEFT interop", 8);
}
