// The threads the CPU kernels run on: XLA's intra-op thread pool, handed to every FFI handler
// as its ThreadPool context (na_cpu.cc adapts it), not threads of their own. The calling
// thread always takes part, so a call finishes even when the pool runs nothing in parallel
// (XLA does not promise that scheduled tasks run concurrently).
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>

namespace jnat::cpu {

class Workers {
 public:
  virtual ~Workers() = default;
  // How many threads may work at once, the caller included (>= 1).
  virtual int64_t size() const = 0;
  // Runs body(0) on the calling thread and body(1) .. body(n - 1) on pool threads, returning
  // when every call that started has returned. A call that has not started by the time
  // body(0) returns is skipped: bodies share their work through a counter (ForEachItem), so
  // that the caller alone finishes it if it must.
  virtual void Run(int64_t n, const std::function<void(int64_t)>& body) const = 0;
};

// Runs body(scratch, i) for every i < n_items, spreading the items over the workers (all of
// them if `threads`, else the caller alone) in any order; scratch = make_scratch() once per
// worker that gets an item. Deterministic results are the body's job: items must not
// depend on which worker runs them.
template <typename MakeScratch, typename Body>
void ForEachItem(const Workers& workers, bool threads, int64_t n_items,
                 MakeScratch&& make_scratch, Body&& body) {
  std::atomic<int64_t> next{0};
  const int64_t n = threads ? std::min(workers.size(), n_items) : 1;
  workers.Run(n, [&](int64_t) {
    std::optional<decltype(make_scratch())> scratch;
    for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) {
      if (!scratch) scratch.emplace(make_scratch());
      body(*scratch, i);
    }
  });
}

// Runs body(begin, end) over consecutive ranges covering [0, n), in parallel when n is
// at least `grain`.
template <typename Body>
void ForEachRange(const Workers& workers, int64_t n, int64_t grain, Body&& body) {
  const int64_t chunks = std::max<int64_t>(1, std::min(4 * workers.size(), n / grain));
  const int64_t len = (n + chunks - 1) / chunks;
  ForEachItem(workers, chunks > 1, chunks, [] { return 0; },
              [&](int, int64_t c) { body(c * len, std::min(n, (c + 1) * len)); });
}

}  // namespace jnat::cpu
