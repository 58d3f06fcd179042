-- Raises the user's inbox mark, and a device's when named, to an offset; marks never move
-- back nor past the newest entry. A device seen for the first time starts at the floor; past
-- the most device marks allowed, the one acknowledged least recently is dropped.
--
-- KEYS: 1 the inbox's meta hash (last, acked, uses), 2 the device marks (zset device -> mark),
--       3 the order of use (zset device -> use number)
-- ARGV: 1 the device (empty: none), 2 the offset, 3 the most device marks
-- Returns {0, the mark after (the device's when named)} or {1, the newest offset} when the
-- offset is beyond it.
local offset = tonumber(ARGV[2])
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
if offset > last then
  return {1, last}
end
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local result = math.max(acked, offset)
if ARGV[1] ~= '' then
  local known = redis.call('ZSCORE', KEYS[2], ARGV[1])
  local start
  if known then
    start = tonumber(known)
  else
    start = acked
    local lowest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    if lowest[2] then
      start = math.min(start, tonumber(lowest[2]))
    end
    if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then
      local evicted = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
      if evicted then
        redis.call('ZREM', KEYS[2], evicted)
        redis.call('ZREM', KEYS[3], evicted)
      end
    end
  end
  result = math.max(start, offset)
  redis.call('ZADD', KEYS[2], result, ARGV[1])
  redis.call('ZADD', KEYS[3], redis.call('HINCRBY', KEYS[1], 'uses', 1), ARGV[1])
end
if offset > acked then
  redis.call('HSET', KEYS[1], 'acked', offset)
end
return {0, result}
