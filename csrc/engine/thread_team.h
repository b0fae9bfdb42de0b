// A team of threads kept for a whole training call, so that a step too small
// for at::parallel_for's fork and join still runs its chunks on two threads.
//
// Why: a 100-row curve-fit step (1→[20]×3→1, ~13 µs on one thread) split
// into two chunks ran at 11 µs a step when OpenMP's threads kept spinning
// between the steps (OMP_WAIT_POLICY=active) and at 21 µs when the second
// thread went to sleep after each parallel region and had to be woken — which
// of the two a process got was a matter of chance. A user's environment is
// not ours to set; a fit call's own team is. Its helpers spin between passes
// (and yield when they have spun long), as an active OpenMP team does, for as
// long as the call runs, and leave when it returns.
//
// Work is claimed, not assigned: every member — the calling thread (the
// leader) and each helper — takes the next unclaimed chunk of the current
// pass until none is left, and the leader waits only for the chunks that
// were claimed. A helper that never started (the region got fewer threads
// than asked for, or the backend queues its tasks) is therefore never waited
// for: the leader runs the chunks itself. Which thread runs a chunk does not
// change its result: each chunk writes its own partial sums, which the pass
// adds in chunk order.
#pragma once

#include <ATen/Parallel.h>

#include <atomic>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>

#include "mlp_engine.h"

namespace fusedgrad::engine {

class ThreadTeam final : public ChunkRunner {
 public:
  // Runs leader(team) on this thread with up to `threads` − 1 helpers serving the team's passes, or
  // leader(nullptr) where no second thread can be had (one thread, or already inside a parallel
  // region). Returns when the leader does; an exception of the leader's is rethrown after the
  // helpers have left.
  template <typename Leader>
  static void lead(int64_t threads, Leader&& leader) {
    if (threads < 2 || at::get_num_threads() < 2 || at::in_parallel_region()) {
      leader(static_cast<const ChunkRunner*>(nullptr));
      return;
    }
    ThreadTeam team;
    teams_led_.fetch_add(1, std::memory_order_relaxed);
    at::parallel_for(0, threads, 1, [&](int64_t i0, int64_t) {
      if (i0 != 0) {
        team.serve();
        return;
      }
      struct Dismiss {  // the helpers leave however the leader returns
        ThreadTeam& t;
        ~Dismiss() { t.stop_.store(true, std::memory_order_release); }
      } dismiss{team};
      leader(static_cast<const ChunkRunner*>(&team));
    });
  }

  // How many teams lead() has formed in this process (tests: fusedgrad._C._testing_teams_led).
  static int64_t teams_led() { return teams_led_.load(std::memory_order_relaxed); }

  // Called by the leader only: chunk(0 … chunks − 1), each exactly once, on whichever members claim them.
  void run(int64_t chunks, const std::function<void(int64_t)>& chunk) const override {
    if (chunks <= 0) return;
    fn_.store(&chunk, std::memory_order_relaxed);
    chunks_.store(chunks, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    const uint64_t job = (state_.load(std::memory_order_relaxed) >> 32) + 1;
    state_.store(job << 32, std::memory_order_release);  // publishes the job: claims start at chunk 0
    work(job);
    for (int64_t spins = 0; done_.load(std::memory_order_acquire) != chunks; ++spins) pause(spins);
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
  }

 private:
  ThreadTeam() = default;

  static void pause(int64_t spins) {
    if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();  // spun ~10–50 µs: the leader is busy elsewhere (an all-reduce, a long update)
    }
  }

  // Claims and runs chunks of job `job` until none is left (or a newer job was published).
  void work(uint64_t job) const {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if ((s >> 32) != job) return;
      const int64_t chunks = chunks_.load(std::memory_order_relaxed);
      const std::function<void(int64_t)>* fn = fn_.load(std::memory_order_relaxed);
      const auto next = static_cast<int64_t>(s & 0xffffffffu);
      if (next >= chunks) return;
      // The claim succeeds only while `job` is current, so chunks and fn read above are this job's.
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      try {
        (*fn)(next);
      } catch (...) {
        std::lock_guard<std::mutex> lock(error_mutex_);
        if (!error_) error_ = std::current_exception();
      }
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  // A helper: waits for each new job, works on it, until dismissed.
  void serve() const {
    uint64_t seen = 0;
    int64_t spins = 0;
    for (;;) {
      const uint64_t job = state_.load(std::memory_order_acquire) >> 32;
      if (job != seen) {
        seen = job;
        spins = 0;
        work(job);
      } else if (stop_.load(std::memory_order_acquire)) {
        return;
      } else {
        pause(spins++);
      }
    }
  }

  // The job number (high 32 bits) and its next unclaimed chunk (low 32 bits), claimed by CAS.
  mutable std::atomic<uint64_t> state_{0};
  mutable std::atomic<const std::function<void(int64_t)>*> fn_{nullptr};
  mutable std::atomic<int64_t> chunks_{0};
  mutable std::atomic<int64_t> done_{0};
  std::atomic<bool> stop_{false};
  mutable std::mutex error_mutex_;
  mutable std::exception_ptr error_;
  static inline std::atomic<int64_t> teams_led_{0};
};

}  // namespace fusedgrad::engine
