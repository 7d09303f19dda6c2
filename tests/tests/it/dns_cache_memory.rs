//! `dns.cache.maxBytes` is a bound on memory, not on the response bytes alone: a counting global
//! allocator measures the heap a cache really holds (each allocation counted as the glibc chunk
//! it takes: 8-byte header, 16-byte aligned, 32 bytes at least) and the cache's own count must
//! be at least that, and not wildly more. No root, no namespace: nothing leaves this process.
//!
//! The allocator is the whole test binary's (every integration test is in it), so it counts
//! per thread: a measurement sees only what its own test's thread allocated and freed, never
//! the tests running beside it. The cache is synchronous: its work happens on the caller's
//! thread.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nodekeeper::dns::cache::{Cache, Entry};
use nodekeeper::dns::wire;

thread_local! {
    /// Live heap bytes of this thread (allocated minus freed by it), as chunks. `const` and
    /// without a destructor: reading it never allocates, so the allocator may use it.
    static LIVE: Cell<i64> = const { Cell::new(0) };
    /// Allocations made by this thread (`alloc` and `realloc` calls), their requested bytes,
    /// and how many asked for `LARGE` bytes or more (`dns_miss_allocations`).
    static MADE: Cell<Made> = const { Cell::new(Made { count: 0, bytes: 0, large: 0 }) };
}

/// The size from which glibc's allocator leaves its per-thread cache and fast bins (1,032
/// bytes: tcache's largest); rounded to 1 KiB. Such allocations interleaved with small frees
/// are what `_int_malloc`, `unlink_chunk` and `malloc_consolidate` cost (issue #22).
pub const LARGE: usize = 1024;

/// What this thread allocated so far (see `made`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Made {
    pub count: u64,
    pub bytes: u64,
    pub large: u64,
}

impl std::ops::Sub for Made {
    type Output = Made;
    fn sub(self, o: Made) -> Made {
        Made {
            count: self.count - o.count,
            bytes: self.bytes - o.bytes,
            large: self.large - o.large,
        }
    }
}

/// This thread's allocations so far (never allocates).
pub fn made() -> Made {
    MADE.with(Cell::get)
}

fn count(bytes: i64) {
    // `try_with`: never panic inside the allocator, even while a thread is being torn down.
    let _ = LIVE.try_with(|live| live.set(live.get() + bytes));
}

fn count_made(size: usize) {
    let _ = MADE.try_with(|m| {
        let mut v = m.get();
        v.count += 1;
        v.bytes += size as u64;
        v.large += u64::from(size >= LARGE);
        m.set(v);
    });
}

/// This thread's live heap bytes, as chunks.
fn live() -> i64 {
    LIVE.with(Cell::get)
}

fn chunk(size: usize) -> i64 {
    ((size + 8).div_ceil(16) * 16).max(32) as i64
}

struct Counting;

// SAFETY: every call is passed unchanged to the system allocator; the wrapper only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(chunk(layout.size()));
        count_made(layout.size());
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-chunk(layout.size()));
        // SAFETY: `ptr` came from `alloc`/`realloc` above with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(chunk(new_size) - chunk(layout.size()));
        count_made(new_size);
        // SAFETY: as for `dealloc`, and `new_size` is our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A typical cluster answer: `svc-<i>.ns-<i % 50>.svc.cluster.local. A`, one A record.
fn answer(i: usize) -> (Vec<u8>, Vec<u8>) {
    let name = format!("svc-{i}.ns-{}.svc.cluster.local", i % 50);
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let parsed = wire::parse_query(&q).expect("query parses");
    let mut key = Vec::new();
    parsed.key_into(&q, &mut key);
    let mut r = q.clone();
    r[2] |= 0x80;
    r[3] = 0x80;
    r[7] = 1;
    r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4, 10, 96, 0, 1]);
    (key, r)
}

fn entry(r: Vec<u8>, now: Instant) -> Arc<Entry> {
    let info = wire::scan_response(&r).expect("response scans");
    Arc::new(Entry {
        bytes: r.into(),
        ttl_offsets: info.ttl_offsets.into(),
        rcode: 0,
        inserted: now,
        ttl: 30,
        stale_until: now + Duration::from_secs(3600),
        hits: Default::default(),
        prefetching: Default::default(),
        failed_until_ms: Default::default(),
    })
}

#[test]
fn the_byte_count_covers_every_allocation_an_entry_takes() {
    const N: usize = 50_000;
    let now = Instant::now();
    // Everything but the cache's own work is made before the measurement.
    let made: Vec<(Vec<u8>, Arc<Entry>)> = (0..N)
        .map(|i| {
            let (key, r) = answer(i);
            (key, entry(r, now))
        })
        .collect();
    let entries_heap: i64 = made
        .iter()
        .map(|(_, e)| {
            chunk(e.bytes.len())
                + chunk(e.ttl_offsets.len() * 2)
                + chunk(2 * size_of::<usize>() + size_of::<Entry>())
        })
        .sum();
    let before = live();
    let cache = Cache::new(1_000_000, 1 << 40);
    for (key, e) in &made {
        cache.insert(key, e.clone());
    }
    // The entries' own allocations were made above; the cache now owns them as well.
    let real = live() - before + entries_heap;
    let charged = cache.bytes() as i64;
    eprintln!(
        "{N} entries: really {} bytes each, charged {} ({:.2}x)",
        real / N as i64,
        charged / N as i64,
        charged as f64 / real as f64
    );
    assert!(
        charged >= real,
        "charged {charged} < real {real}: maxBytes would understate memory"
    );
    assert!(
        charged <= real * 3 / 2,
        "charged {charged} is more than 1.5x the real {real}"
    );
    drop(made);
}

#[test]
fn a_full_cache_holds_no_more_heap_than_max_bytes() {
    const MAX_BYTES: u64 = 4 << 20;
    let now = Instant::now();
    let before = live();
    let cache = Cache::new(1_000_000, MAX_BYTES);
    for i in 0..100_000 {
        let (key, r) = answer(i);
        cache.insert(&key, entry(r, now));
    }
    let real = live() - before;
    eprintln!(
        "maxBytes {MAX_BYTES}: {} entries, counted {} bytes, heap {real} bytes",
        cache.len(),
        cache.bytes()
    );
    assert!(cache.len() < 100_000, "evicted to stay within maxBytes");
    assert!(
        real <= MAX_BYTES as i64,
        "heap {real} bytes over maxBytes {MAX_BYTES}"
    );
}

/// The counter is per thread: a megabyte held by another thread (another test, in the one test
/// binary) is not in this thread's measurement, and one held here is.
#[test]
fn the_counter_sees_only_this_threads_allocations() {
    let before = live();
    let (allocated, other_holds) = std::sync::mpsc::channel::<()>();
    let (release, held) = std::sync::mpsc::channel::<()>();
    let other = std::thread::spawn(move || {
        let block = vec![1u8; 1 << 20];
        allocated.send(()).unwrap();
        let _ = held.recv();
        drop(block);
    });
    other_holds
        .recv()
        .expect("the other thread holds its megabyte");
    let mine = vec![1u8; 1 << 20];
    let here = live() - before;
    drop(release);
    other.join().unwrap();
    assert!(
        (1 << 20..2 << 20).contains(&here),
        "this thread's 1 MiB counted once, the other thread's not: {here} bytes"
    );
    drop(mine);
}
