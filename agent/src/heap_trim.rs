//! Gives freed heap back to the kernel after a burst (issue #15). glibc keeps what a burst
//! freed inside its arenas: a flood of unique DNS names at a silent upstream took the agent
//! from ~40 to ~85 MiB RSS (debug build; 177 MiB in the review's run) while `mallinfo2`
//! counted ~1.8 MB in use and ~45 MB free, and `malloc_trim(0)` brought it back to ~44 MiB.
//! Not a leak, but memory a pod limit charges for ever. So a thread checks the free heap every
//! `INTERVAL` and trims when more than `TRIM_ABOVE` lies free.
//!
//! In the binary, not the library: the library forbids `unsafe`, and these are two FFI calls.
//! Only for glibc targets; other allocators return memory on their own terms.

use std::time::Duration;

/// How often the free heap is checked; also the most a burst's memory stays charged after it.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// Free heap worth a trim: below it, the pages are likely reused before the next check.
pub const TRIM_ABOVE: usize = 8 << 20;

/// Starts the trimming thread (a plain thread: it must run when the runtime's workers are busy
/// with the very flood whose memory it returns).
pub fn spawn() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let started = std::thread::Builder::new()
            .name("heap-trim".into())
            .spawn(|| {
                let mut after_last_trim = 0;
                loop {
                    std::thread::sleep(INTERVAL);
                    trim_if_worth_it(&mut after_last_trim);
                }
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start the heap trimming thread; freed heap stays charged");
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_if_worth_it(after_last_trim: &mut usize) {
    use nix::libc;
    // SAFETY: mallinfo2 only reads the allocator's statistics (under its arena locks); it has
    // no preconditions.
    let free = unsafe { libc::mallinfo2() }.fordblks;
    // A trim leaves the free chunks free (only their pages go back): the same free count as
    // after the last trim means nothing new to return.
    if free < TRIM_ABOVE || free.abs_diff(*after_last_trim) < TRIM_ABOVE / 8 {
        return;
    }
    // SAFETY: malloc_trim only returns free pages to the kernel (madvise/sbrk under the arena
    // locks); no pointer the program holds is affected.
    unsafe { libc::malloc_trim(0) };
    // SAFETY: as above.
    *after_last_trim = unsafe { libc::mallinfo2() }.fordblks;
    tracing::debug!(free_heap = free, "returned freed heap pages to the kernel");
}
