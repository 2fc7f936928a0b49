-- wrk script: POST single locate quotes with the X-API-Key from the environment.
--
--   BENCH_API_KEY      the key (required)
--   BENCH_BODIES_FILE  optional file with one JSON request body per line, sent in rotation
--                      (default: one AAPL quote for demo_client)
--   BENCH_PATH         optional path (default /api/v1/calculate-locate)
--
-- Counts every response whose status is not 2xx and prints one machine-readable line from `done`:
--   wrk_quote: responses=N non2xx=N connect=N read=N write=N timeout=N status_errors=N
-- A run with non2xx > 0 or socket errors is invalid.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

local function load_bodies()
   local bodies = {}
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
   local key = os.getenv("BENCH_API_KEY")
   if not key or key == "" then
      error("BENCH_API_KEY is not set")
   end
   local path = os.getenv("BENCH_PATH") or "/api/v1/calculate-locate"
   local headers = { ["Content-Type"] = "application/json", ["X-API-Key"] = key }
   prepared = {}
   for _, body in ipairs(load_bodies()) do
      table.insert(prepared, wrk.format("POST", path, headers, body))
   end
   next_index = 0
   responses = 0
   non2xx = 0
end

function request()
   next_index = next_index % #prepared + 1
   return prepared[next_index]
end

function response(status, headers, body)
   responses = responses + 1
   if status < 200 or status > 299 then
      non2xx = non2xx + 1
   end
end

function done(summary, latency, requests)
   local total_responses, total_non2xx = 0, 0
   for _, thread in ipairs(threads) do
      total_responses = total_responses + (thread:get("responses") or 0)
      total_non2xx = total_non2xx + (thread:get("non2xx") or 0)
   end
   local errors = summary.errors
   io.write(string.format(
      "wrk_quote: responses=%d non2xx=%d connect=%d read=%d write=%d timeout=%d status_errors=%d\n",
      total_responses, total_non2xx, errors.connect, errors.read, errors.write, errors.timeout,
      errors.status))
end
