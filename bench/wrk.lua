-- wrk script for `make bench` (bench/run.sh): POSTs one JSON body to one path, cycling through
-- 64 sessions (x-session-id) so the gateway's sticky sessions spread requests over every
-- account, the OAuth one included. The requests are built once, in init, so wrk spends nothing
-- per request on Lua.
--
--   wrk -t1 -c16 -d10s -s bench/wrk.lua http://HOST:PORT -- PATH BODY_FILE API_KEY
--
-- done() prints one line, `WRK {json}`, with the counts and latency percentiles in microseconds.

local requests_ = {}
local n = 0

function init(args)
   local path, body_file, key = args[1], args[2], args[3]
   local f = assert(io.open(body_file, "rb"))
   local body = f:read("*a")
   f:close()
   for s = 1, 64 do
      requests_[s] = wrk.format("POST", path, {
         ["content-type"] = "application/json",
         ["anthropic-version"] = "2023-06-01",
         ["x-api-key"] = key,
         ["x-session-id"] = "wrk-session-" .. s,
      }, body)
   end
end

function request()
   n = n % 64 + 1
   return requests_[n]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK {"requests":%d,"duration_us":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d,' ..
      '"status_errors":%d,"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeout_errors":%d}\n',
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency.mean, latency.max,
      e.status, e.connect, e.read, e.write, e.timeout))
end
