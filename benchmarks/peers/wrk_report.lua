-- wrk -s hook for benchmarks/peers/run.py: prints one line "WRKJSON {...}" at the end.
--
-- wrk 4.x "corrects" its latency histogram for coordinated omission before done() runs:
-- for every response slower than 2 x E (E = run time / (requests per connection), about
-- the mean latency) it adds synthetic samples at latency - E, latency - 2E, ... > E. Its
-- printed percentiles (and latency:percentile() here) are those corrected ones. To count
-- the real responses answered within WRK_GOOD_US, this undoes the correction on wrk's own
-- histogram (stats.h of wrk 4.x: uint64 count, limit, min, max, data[limit], one bin per
-- microsecond), read through LuaJIT's FFI. The layout is checked against wrk's own
-- min/max/count first; "raw_ok": false means the raw figures are not to be used.
local ffi = require("ffi")

local good_us = tonumber(os.getenv("WRK_GOOD_US") or "100000")
local connections = tonumber(os.getenv("WRK_CONNECTIONS") or "0")

local function raw_histogram(latency, expected)
  local payload = ffi.cast("void *", latency)            -- the userdata holds a stats *
  local s = ffi.cast("uint64_t **", payload)[0]
  local count, min, max = tonumber(s[0]), tonumber(s[2]), tonumber(s[3])
  if count == 0 or min ~= latency.min or max ~= latency.max then return nil end
  local data, total = s + 4, 0
  for n = min, max do total = total + tonumber(data[n]) end
  if total ~= count then return nil end
  local raw = ffi.new("double[?]", max + 1)
  local acc = ffi.new("double[?]", max + 1)              -- raw[n] + raw[n + E] + ...
  for n = max, min, -1 do
    local corrected = tonumber(data[n])
    if expected > 0 and n > expected then
      local above = (n + expected <= max) and acc[n + expected] or 0
      raw[n] = corrected - above
      acc[n] = raw[n] + above
    else
      raw[n] = corrected
    end
    if raw[n] < 0 then return nil end
  end
  return raw, min, max
end

local function percentile(raw, min, max, total, p)
  local rank, seen = math.max(1, math.ceil(total * p / 100)), 0
  for n = min, max do
    seen = seen + raw[n]
    if seen >= rank then return n end
  end
  return max
end

done = function(summary, latency, requests)
  local e = summary.errors
  local expected = 0
  local per_connection = math.floor(summary.requests / math.max(connections, 1))
  if connections > 0 and per_connection > 0 then
    expected = math.floor(summary.duration / per_connection)
  end
  local raw, min, max = nil, 0, 0
  if connections > 0 and summary.requests > 0 then
    raw, min, max = raw_histogram(latency, expected)
  end
  local total, good, p50, p99 = 0, 0, 0, 0
  if raw then
    for n = min, max do
      total = total + raw[n]
      if n <= good_us then good = good + raw[n] end
    end
    p50 = percentile(raw, min, max, total, 50)
    p99 = percentile(raw, min, max, total, 99)
  end
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "connect": %d, "read": %d, "write": %d, '
    .. '"status": %d, "timeout": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, '
    .. '"raw_ok": %s, "raw_total": %d, "raw_good": %d, "raw_p50_us": %d, "raw_p99_us": %d, '
    .. '"co_interval_us": %d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max,
    tostring(raw ~= nil), total, good, p50, p99, expected))
end
