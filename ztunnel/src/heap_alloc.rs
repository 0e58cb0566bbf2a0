//! The `heap-profiling` build's allocator: jemalloc with its sampling heap profiler
//! compiled in but inactive, so it costs nothing until `/debug/pprof/heap/profiling
//! ?activate=true` turns it on (then about one allocation per 512 KiB allocated is
//! sampled, with its stack). Set here, in the library, so the test binaries allocate
//! the same way as `ztunnel`.

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc reads its options from this symbol at start: profiling available, inactive,
/// a sample every 2^19 bytes on average.
#[allow(non_upper_case_globals)]
#[export_name = "malloc_conf"]
pub static malloc_conf: &[u8] = b"prof:true,prof_active:false,lg_prof_sample:19\0";
