-- Appends one message to a room's stream and publishes its frame, in one step: the offset is
-- taken, the message stored and the frame published atomically, so frames of one room leave
-- Redis in offset order whichever node appended them.
--
-- With a retry record (KEYS[4], the sender's request under the room's hash tag), a request
-- recorded within its window is answered with the first attempt's result, storing and
-- publishing nothing; a new one is recorded with its result for ARGV[9] milliseconds.
--
-- KEYS: 1 the stream's meta hash (epoch, last), 2 the stream, 3 the room's pub/sub channel,
--       4 (optional) the request's retry record (a string: "offset epoch ts id")
-- ARGV: 1 an epoch for a new stream, 2 PUBLISH or SPUBLISH, 3 the envelope awaiting its
--       offset, 4 id, 5 from, 6 ts, 7 binary (0/1), 8 content, 9 (with KEYS[4]) the record's
--       lifetime in milliseconds
-- Returns {offset, epoch}, or for a recorded request its record.
local record = KEYS[4]
if record then
  local first = redis.call('GET', record)
  if first then
    return first
  end
end
redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1])
local offset = redis.call('HINCRBY', KEYS[1], 'last', 1)
redis.call('XADD', KEYS[2], offset .. '-0',
  'i', ARGV[4], 'f', ARGV[5], 't', ARGV[6], 'b', ARGV[7], 'c', ARGV[8])
redis.call(ARGV[2], KEYS[3], ARGV[3] .. offset)
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if record then
  redis.call('SET', record, offset .. ' ' .. epoch .. ' ' .. ARGV[6] .. ' ' .. ARGV[4],
    'PX', ARGV[9])
end
return {offset, epoch}
