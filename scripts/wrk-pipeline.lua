-- wrk script: DEPTH requests of GET /v1/allow (the sample rules' /v1/search) pipelined on each connection
-- (one write, DEPTH answers read), users drawn from 10,000.
--   wrk -t1 -c50 -d5s -s scripts/wrk-pipeline.lua http://127.0.0.1:8400 -- 16
local depth = 16

init = function(args)
  depth = tonumber(args[1]) or depth
  local batch = {}
  for i = 1, depth do
    batch[i] = wrk.format("GET", "/v1/allow?endpoint=/v1/search&user=user-" .. math.random(0, 9999))
  end
  req = table.concat(batch)
end

request = function()
  return req
end
