// SPDX-License-Identifier: GPL-2.0
/*
 * Layout leases (F_LAYOUT, F_LAYOUT | F_EXCLUSIVE) from user space.
 *
 * Set LAYOUT_LEASE_DIR to a directory on a filesystem mounted with -o dax
 * (ext4 or xfs) to also check that truncate and hole punch fail while an
 * exclusive layout lease is held: ETXTBSY for another process, EDEADLK for
 * the holder's own. Without it, or on a non-DAX directory, those tests are
 * skipped. On a kernel without layout leases every test is skipped.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/falloc.h>

#include "../../kselftest_harness.h"

#ifndef F_LAYOUT
#define F_LAYOUT	16
#endif
#ifndef F_EXCLUSIVE
#define F_EXCLUSIVE	32
#endif
#ifndef STATX_ATTR_DAX
#define STATX_ATTR_DAX	0x00200000
#endif

#define FILE_SIZE	(2 << 20)

static int layout_leases_supported(int fd)
{
	if (fcntl(fd, F_SETLEASE, F_LAYOUT) == 0) {
		fcntl(fd, F_SETLEASE, F_UNLCK);
		return 1;
	}
	return 0;
}

static int is_dax(int fd)
{
	struct statx stx;

	if (statx(fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &stx))
		return 0;
	return !!(stx.stx_attributes & STATX_ATTR_DAX);
}

/* Run fn in a child process and return the errno it saw (0 on success). */
static int in_child(int (*fn)(const char *path), const char *path)
{
	int status;
	pid_t pid = fork();

	if (pid == 0)
		_exit(fn(path) ? errno : 0);
	if (pid < 0 || waitpid(pid, &status, 0) != pid || !WIFEXITED(status))
		return -1;
	return WEXITSTATUS(status);
}

static int truncate_to_zero(const char *path)
{
	return truncate(path, 0);
}

static int punch_first_page(const char *path)
{
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		return -1;
	return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 4096);
}

static int write_one_page(const char *path)
{
	char buf[4096];
	int fd = open(path, O_WRONLY);

	if (fd < 0)
		return -1;
	memset(buf, 0x5a, sizeof(buf));
	return pwrite(fd, buf, sizeof(buf), 4096) == sizeof(buf) ? 0 : -1;
}

FIXTURE(lease) {
	char path[4096];
	int fd;
	int dax;
};

FIXTURE_SETUP(lease)
{
	const char *dir = getenv("LAYOUT_LEASE_DIR");

	snprintf(self->path, sizeof(self->path), "%s/layout_lease.XXXXXX",
		 dir ? dir : "/tmp");
	self->fd = mkstemp(self->path);
	ASSERT_GE(self->fd, 0);
	ASSERT_EQ(0, fallocate(self->fd, 0, 0, FILE_SIZE));
	self->dax = is_dax(self->fd);
	if (!layout_leases_supported(self->fd))
		SKIP(return, "kernel without layout leases (F_SETLEASE F_LAYOUT: EINVAL)");
}

FIXTURE_TEARDOWN(lease)
{
	close(self->fd);
	unlink(self->path);
}

TEST_F(lease, layout_set_get_release)
{
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_LAYOUT));
	ASSERT_EQ(F_LAYOUT, fcntl(self->fd, F_GETLEASE));
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_UNLCK));
	ASSERT_EQ(F_UNLCK, fcntl(self->fd, F_GETLEASE));
}

TEST_F(lease, exclusive_set_get_release)
{
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_LAYOUT | F_EXCLUSIVE));
	/* The exclusive bit is a property of the lease, not its type. */
	ASSERT_EQ(F_LAYOUT, fcntl(self->fd, F_GETLEASE));
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_UNLCK));
	ASSERT_EQ(F_UNLCK, fcntl(self->fd, F_GETLEASE));
}

TEST_F(lease, exclusive_needs_layout)
{
	ASSERT_EQ(-1, fcntl(self->fd, F_SETLEASE, F_EXCLUSIVE));
	ASSERT_EQ(EINVAL, errno);
	ASSERT_EQ(-1, fcntl(self->fd, F_SETLEASE, F_RDLCK | F_EXCLUSIVE));
	ASSERT_EQ(EINVAL, errno);
}

TEST_F(lease, not_on_a_directory)
{
	int dfd = open("/", O_RDONLY | O_DIRECTORY);

	ASSERT_GE(dfd, 0);
	ASSERT_EQ(-1, fcntl(dfd, F_SETLEASE, F_LAYOUT | F_EXCLUSIVE));
	ASSERT_EQ(EINVAL, errno);
	close(dfd);
}

TEST_F(lease, truncate_by_other_etxtbsy)
{
	if (!self->dax)
		SKIP(return, "LAYOUT_LEASE_DIR is not on a DAX filesystem");
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_LAYOUT | F_EXCLUSIVE));
	ASSERT_EQ(ETXTBSY, in_child(truncate_to_zero, self->path));
	ASSERT_EQ(ETXTBSY, in_child(punch_first_page, self->path));
	/* Writing into existing blocks does not change the layout. */
	ASSERT_EQ(0, in_child(write_one_page, self->path));
	ASSERT_EQ(F_LAYOUT, fcntl(self->fd, F_GETLEASE));
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_UNLCK));
	ASSERT_EQ(0, in_child(truncate_to_zero, self->path));
}

TEST_F(lease, truncate_by_holder_edeadlk)
{
	if (!self->dax)
		SKIP(return, "LAYOUT_LEASE_DIR is not on a DAX filesystem");
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_LAYOUT | F_EXCLUSIVE));
	ASSERT_EQ(-1, ftruncate(self->fd, 0));
	ASSERT_EQ(EDEADLK, errno);
	ASSERT_EQ(0, fcntl(self->fd, F_SETLEASE, F_UNLCK));
	ASSERT_EQ(0, ftruncate(self->fd, 0));
}

TEST(file_pins_empty_without_pins)
{
	char buf[256];
	ssize_t n;
	int fd = open("/proc/self/file_pins", O_RDONLY);

	if (fd < 0 && errno == ENOENT)
		SKIP(return, "kernel without /proc/<pid>/file_pins");
	ASSERT_GE(fd, 0);
	n = read(fd, buf, sizeof(buf));
	ASSERT_EQ(0, n);
	close(fd);
}

TEST_HARNESS_MAIN
