//! libFuzzer target `loader` (tests/bench/fuzz_targets.rs): a panic or a broken property is a crash.
#![no_main]

#[path = "../../tests/bench/fuzz_targets.rs"]
#[allow(dead_code)]
mod targets;

use std::cell::RefCell;

thread_local! {
    static STATE: RefCell<targets::State> = RefCell::new(targets::State::new());
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    STATE.with(|st| {
        let mut u = arbitrary::Unstructured::new(data);
        if let Ok(Err(why)) = targets::loader(&mut u, &mut st.borrow_mut()) {
            panic!("loader: {why}");
        }
    })
});
