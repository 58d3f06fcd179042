-- Reads an inbox's entries above the reader's mark, in one snapshot. The mark is the device's,
-- or for a device without one the floor (the lowest device mark, or the user's mark if lower);
-- without a device, the user's mark.
--
-- KEYS: 1 the inbox's meta hash, 2 the inbox stream, 3 the device marks
-- ARGV: 1 the device (empty: none), 2 the offset to read after, 3 the most entries
-- Returns {mark, whether the device has a mark of its own (0/1), entries}.
local acked = tonumber(redis.call('HGET', KEYS[1], 'acked') or '0')
local mark, own = acked, 0
if ARGV[1] ~= '' then
  local device = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if device then
    mark, own = tonumber(device), 1
  else
    local lowest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
    if lowest[2] then
      mark = math.min(acked, tonumber(lowest[2]))
    end
  end
end
-- The caller's offset stays a string: a Lua number would print a large one in a form
-- XRANGE refuses.
local from = mark
if tonumber(ARGV[2]) > mark then
  from = ARGV[2]
end
return {mark, own, redis.call('XRANGE', KEYS[2], '(' .. from, '+', 'COUNT', tonumber(ARGV[3]))}
