-- Appends a direct message to one recipient's inbox and publishes the recipient's frame, once
-- per message id: a retry of the same message returns the offset it got the first time and
-- publishes nothing.
--
-- KEYS: 1 the inbox's meta hash (epoch, last, acked, uses), 2 the inbox stream, 3 the device
--       marks (zset device -> mark), 4 the ids seen (zset id -> offset), 5 the user's channel
-- ARGV: 1 an epoch for a new inbox, 2 PUBLISH or SPUBLISH, 3 the envelope awaiting its offset,
--       4 the most entries above the floor (0: no bound), 5 ids remembered, 6 their lifetime
--       in seconds, 7 id, 8 from, 9 recipients (JSON), 10 ts, 11 binary (0/1), 12 content
-- Returns the inbox offset, or 0 when the inbox is full.
local seen = redis.call('ZSCORE', KEYS[4], ARGV[7])
if seen then
  return tonumber(seen)
end
local limit = tonumber(ARGV[4])
if limit > 0 then
  local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
  local floor = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
  local lowest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  if lowest[2] then
    floor = math.min(floor, tonumber(lowest[2]))
  end
  if last - floor >= limit then
    return 0
  end
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local offset = redis.call('HINCRBY', KEYS[1], 'last', 1)
redis.call('XADD', KEYS[2], offset .. '-0',
  'i', ARGV[7], 'f', ARGV[8], 'o', ARGV[9], 't', ARGV[10], 'b', ARGV[11], 'c', ARGV[12])
redis.call('ZADD', KEYS[4], offset, ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', '(' .. (offset - tonumber(ARGV[5]) + 1))
redis.call('EXPIRE', KEYS[4], ARGV[6])
redis.call(ARGV[2], KEYS[5], ARGV[3] .. offset)
return offset
