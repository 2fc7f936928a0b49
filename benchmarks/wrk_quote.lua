-- wrk script: POST locate quotes with the X-API-Key from the environment.
--
--   BENCH_API_KEY       the key (required unless BENCH_NO_KEY=1)
--   BENCH_NO_KEY        1: send no X-API-Key (an engine with ENABLE_AUTHENTICATION=false)
--   BENCH_BODIES_FILE   optional file with one JSON request body per line, sent in rotation
--                       (default: one AAPL quote for demo_client)
--   BENCH_BODY_FILE     optional file holding ONE whole request body (any bytes: a large JSON or msgpack
--                       batch); takes precedence over BENCH_BODIES_FILE
--   BENCH_CONTENT_TYPE  the body's media type (default application/json)
--   BENCH_PATH          optional path (default /api/v1/calculate-locate)
--   BENCH_DELAY_MS      paced mode: each connection waits this many milliseconds (a fraction is honoured
--                       on average) after each response before it sends the next request, through wrk's
--                       `delay()` hook. With c connections, c * 1000 / BENCH_DELAY_MS requests per second
--                       at most: a paced closed loop (latency is measured from the send, so coordinated
--                       omission only applies to a response slower than the pacing interval).
--   BENCH_EXPECT_STATUS the status every response should have (default: any 2xx)
--
-- Counts every response whose status is not 2xx (and, with BENCH_EXPECT_STATUS, every response with
-- another status) and prints one machine-readable line from `done`:
--   wrk_quote: responses=N non2xx=N unexpected=N connect=N read=N write=N timeout=N status_errors=N
-- A run with unexpected > 0 or socket errors is invalid.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

local function load_bodies()
   local bodies = {}
   local single = os.getenv("BENCH_BODY_FILE")
   if single and single ~= "" then
      local file = assert(io.open(single, "rb"))
      table.insert(bodies, file:read("*a"))
      file:close()
      return bodies
   end
   local path = os.getenv("BENCH_BODIES_FILE")
   if path and path ~= "" then
      local file = assert(io.open(path, "r"))
      for line in file:lines() do
         if line:match("%S") then
            table.insert(bodies, line)
         end
      end
      file:close()
   end
   if #bodies == 0 then
      table.insert(bodies,
         '{"ticker":"AAPL","position_value":100000,"loan_days":30,"client_id":"demo_client"}')
   end
   return bodies
end

function init(args)
   local headers = { ["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json" }
   local key = os.getenv("BENCH_API_KEY")
   if os.getenv("BENCH_NO_KEY") ~= "1" then
      if not key or key == "" then
         error("BENCH_API_KEY is not set")
      end
      headers["X-API-Key"] = key
   end
   local path = os.getenv("BENCH_PATH") or "/api/v1/calculate-locate"
   prepared = {}
   for _, body in ipairs(load_bodies()) do
      table.insert(prepared, wrk.format("POST", path, headers, body))
   end
   next_index = 0
   responses = 0
   non2xx = 0
   unexpected = 0
   expect_status = tonumber(os.getenv("BENCH_EXPECT_STATUS") or "")
   math.randomseed(os.time())
end

function request()
   next_index = next_index % #prepared + 1
   return prepared[next_index]
end

local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if delay_ms and delay_ms > 0 then
   -- wrk truncates the returned value to whole milliseconds: round up with probability equal to the
   -- fraction, so that the mean wait is BENCH_DELAY_MS exactly.
   function delay()
      return math.floor(delay_ms + math.random())
   end
end

function response(status, headers, body)
   responses = responses + 1
   local ok2xx = status >= 200 and status <= 299
   if not ok2xx then
      non2xx = non2xx + 1
   end
   if expect_status then
      if status ~= expect_status then
         unexpected = unexpected + 1
      end
   elseif not ok2xx then
      unexpected = unexpected + 1
   end
end

function done(summary, latency, requests)
   local total_responses, total_non2xx, total_unexpected = 0, 0, 0
   for _, thread in ipairs(threads) do
      total_responses = total_responses + (thread:get("responses") or 0)
      total_non2xx = total_non2xx + (thread:get("non2xx") or 0)
      total_unexpected = total_unexpected + (thread:get("unexpected") or 0)
   end
   local errors = summary.errors
   io.write(string.format(
      "wrk_quote: responses=%d non2xx=%d unexpected=%d connect=%d read=%d write=%d timeout=%d "
         .. "status_errors=%d\n",
      total_responses, total_non2xx, total_unexpected, errors.connect, errors.read, errors.write,
      errors.timeout, errors.status))
end
