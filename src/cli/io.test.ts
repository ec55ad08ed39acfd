import { describe, expect, it } from 'vitest'
import { describeError, formatBytes, parseCount, parseDuration, parseSize } from './io.js'

describe('cli value parsers', () => {
  it.each([
    ['4096', 4096],
    ['500M', 500 * 2 ** 20],
    ['1G', 2 ** 30],
    ['1.5GiB', 1.5 * 2 ** 30],
    ['2kb', 2048],
    ['0', 0],
  ])('parseSize(%j) = %d', (text, bytes) => expect(parseSize(text)).toBe(bytes))

  it.each([
    ['7d', 7 * 86_400_000],
    ['12h', 12 * 3_600_000],
    ['1h30m', 90 * 60_000],
    ['90s', 90_000],
    ['500ms', 500],
    ['2w', 14 * 86_400_000],
  ])('parseDuration(%j) = %d', (text, ms) => expect(parseDuration(text)).toBe(ms))

  it('rejects malformed values as commander usage errors', () => {
    for (const bad of ['', 'lots', '1X', '-1G']) expect(() => parseSize(bad)).toThrow(expect.objectContaining({ code: 'commander.invalidArgument' }))
    for (const bad of ['', '7', 'd7', '1h x', '3y']) expect(() => parseDuration(bad)).toThrow(expect.objectContaining({ code: 'commander.invalidArgument' }))
    expect(() => parseCount('1.5')).toThrow(expect.objectContaining({ code: 'commander.invalidArgument' }))
  })

  it('formats bytes and folds error messages into one line', () => {
    expect(formatBytes(512)).toBe('512 B')
    expect(formatBytes(1536)).toBe('1.50 KiB')
    expect(formatBytes(200 * 2 ** 20)).toBe('200 MiB')
    expect(describeError(new Error('first\n  second'))).toBe('first second')
    expect(describeError('plain')).toBe('plain')
  })
})
