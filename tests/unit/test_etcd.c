/*
 * server/etcd.c: endpoint lists, base64, the JSON fields the authority
 * reads from etcd's answers (the answers below are etcd 3.4's own), and an
 * HTTP exchange against a fake gateway on loopback: a 200's body, an
 * error's text, nobody listening, and a gateway that never answers (the
 * call must give up by its deadline: the lease's keep-alives depend on it).
 */
#include <criterion/criterion.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "error.h"
#include "etcd.h"
#include "verbs.h"

Test(etcd, endpoint_lists)
{
	struct srv_etcd e;
	char err[256];

	cr_assert_eq(srv_etcd_parse(&e, "http://10.0.0.1:2379, 10.0.0.2:2380", err, sizeof(err)), 0,
		     "%s", err);
	cr_assert_eq(e.n, 2);
	cr_assert_str_eq(e.ep[0].host, "10.0.0.1");
	cr_assert_str_eq(e.ep[0].port, "2379");
	cr_assert_str_eq(e.ep[1].host, "10.0.0.2");
	cr_assert_str_eq(e.ep[1].port, "2380");
	cr_assert_eq(srv_etcd_parse(&e, "https://10.0.0.1:2379", err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert(strstr(err, "http://"), "%s", err);
	cr_assert_eq(srv_etcd_parse(&e, "http://10.0.0.1", err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert_eq(srv_etcd_parse(&e, "http://h:1/v3", err, sizeof(err)), RDMAPS_EINVAL);
	cr_assert_eq(srv_etcd_parse(&e, " , ", err, sizeof(err)), RDMAPS_EINVAL);
}

Test(etcd, base64_as_etcd_writes_it)
{
	char out[64];

	cr_assert_eq(srv_b64_encode("/rdmaps/epoch/0", 15, out, sizeof(out)), 20);
	cr_assert_str_eq(out, "L3JkbWFwcy9lcG9jaC8w");
	srv_b64_encode("epoch=1", 7, out, sizeof(out));
	cr_assert_str_eq(out, "ZXBvY2g9MQ==");
	srv_b64_encode("ab", 2, out, sizeof(out));
	cr_assert_str_eq(out, "YWI=");
	cr_assert_eq(srv_b64_encode("abcdef", 6, out, 8), 0, "too small a buffer is refused");
}

Test(etcd, fields_of_etcd_answers)
{
	const char *grant = "{\"header\":{\"cluster_id\":\"324952591200643719\",\"member_id\":"
			    "\"3319814642761637952\",\"revision\":\"1\",\"raft_term\":\"2\"},"
			    "\"ID\":\"2324035867027736837\",\"TTL\":\"1\"}";
	const char *expired = "{\"result\":{\"header\":{\"cluster_id\":\"3249\",\"revision\":\"3\"},"
			      "\"ID\":\"2324035867027736839\"}}";
	const char *won = "{\"header\":{\"revision\":\"2\"},\"succeeded\":true,\"responses\":[]}";
	const char *lost = "{\"header\":{\"revision\":\"2\"},\"responses\":[{\"response_range\":"
			   "{\"header\":{\"revision\":\"2\"},\"kvs\":[{\"key\":\"L3JkbWFwcy9wYXJ0LzA=\","
			   "\"create_revision\":\"2\",\"mod_revision\":\"2\",\"version\":\"1\","
			   "\"value\":\"ZXBvY2g9MQ==\",\"lease\":\"2324035867027736839\"}],"
			   "\"count\":\"1\"}}]}";
	uint64_t v = 0;
	char val[32];

	cr_assert(srv_json_u64(grant, "ID", &v));
	cr_assert_eq(v, 2324035867027736837ull, "not the header's member_id or cluster_id");
	cr_assert(srv_json_u64(grant, "TTL", &v));
	cr_assert_eq(v, 1);
	cr_assert_not(srv_json_u64(expired, "TTL", &v), "an expired lease has no TTL");
	cr_assert(srv_json_true(won, "succeeded"));
	cr_assert_not(srv_json_true(lost, "succeeded"));
	cr_assert(srv_json_u64(lost, "mod_revision", &v));
	cr_assert_eq(v, 2);
	cr_assert(srv_json_b64(lost, "value", val, sizeof(val)));
	cr_assert_str_eq(val, "epoch=1");
	cr_assert_not(srv_json_b64(lost, "value", val, 4), "too long for the buffer");
	cr_assert_not(srv_json_b64("{\"value\":\"*bad*\"}", "value", val, sizeof(val)));
}

/* A fake gateway: accepts one connection, reads the request, answers
 * (or, with no answer, holds the connection open until told to stop). */
struct fake {
	int lfd;
	const char *answer;
	char request[2048];
	volatile int done;
};

static void *fake_main(void *arg)
{
	struct fake *f = arg;
	int fd = accept(f->lfd, NULL, NULL);
	size_t got = 0;
	char *end;

	/* the whole request (its body is 9 bytes), or closing would reset */
	do {
		ssize_t n = read(fd, f->request + got, sizeof(f->request) - 1 - got);
		if (n <= 0)
			break;
		got += (size_t)n;
		f->request[got] = '\0';
	} while (!(end = strstr(f->request, "\r\n\r\n")) || strlen(end + 4) < 9);
	if (f->answer) {
		ssize_t w = write(fd, f->answer, strlen(f->answer));
		(void)w;
	} else {
		while (!f->done)
			usleep(10000);
	}
	close(fd);
	return NULL;
}

static unsigned fake_listen(struct fake *f)
{
	struct sockaddr_in a = { .sin_family = AF_INET };
	socklen_t al = sizeof(a);

	inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
	f->lfd = socket(AF_INET, SOCK_STREAM, 0);
	cr_assert_eq(bind(f->lfd, (struct sockaddr *)&a, sizeof(a)), 0);
	cr_assert_eq(listen(f->lfd, 4), 0);
	getsockname(f->lfd, (struct sockaddr *)&a, &al);
	return ntohs(a.sin_port);
}

static int fake_call(const char *answer, char *out, size_t outlen, char *why, unsigned ms,
		     struct fake *f)
{
	struct srv_etcd e;
	char url[64], err[128];
	pthread_t th;
	int rc;

	memset(f, 0, sizeof(*f));
	f->answer = answer;
	snprintf(url, sizeof(url), "http://127.0.0.1:%u", fake_listen(f));
	cr_assert_eq(srv_etcd_parse(&e, url, err, sizeof(err)), 0);
	pthread_create(&th, NULL, fake_main, f);
	rc = srv_etcd_post(&e, "/v3/lease/grant", "{\"TTL\":2}", out, outlen, ms, why, 256);
	f->done = 1;
	pthread_join(th, NULL);
	close(f->lfd);
	return rc;
}

Test(etcd, http_exchanges)
{
	struct fake f;
	char out[512], why[256];

	cr_assert_eq(fake_call("HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n"
			       "{\"ID\":\"7\",\"TTL\":\"2\"}",
			       out, sizeof(out), why, 2000, &f),
		     0, "%s", why);
	cr_assert_str_eq(out, "{\"ID\":\"7\",\"TTL\":\"2\"}");
	cr_assert(strstr(f.request, "POST /v3/lease/grant HTTP/1.0\r\n"), "%s", f.request);
	cr_assert(strstr(f.request, "Content-Length: 9\r\n\r\n{\"TTL\":2}"), "%s", f.request);

	cr_assert_eq(fake_call("HTTP/1.0 404 Not Found\r\n\r\n{\"error\":\"etcdserver: requested "
			       "lease not found\"}",
			       out, sizeof(out), why, 2000, &f),
		     RDMAPS_EREMOTE);
	cr_assert(strstr(why, "404") && strstr(why, "lease not found"), "%s", why);

	cr_assert_eq(fake_call("garbage\r\n\r\n", out, sizeof(out), why, 2000, &f), RDMAPS_EPROTO);

	uint64_t t0 = rdmaps__now_ns();
	cr_assert_eq(fake_call(NULL, out, sizeof(out), why, 300, &f), RDMAPS_ETIMEDOUT, "%s", why);
	uint64_t took = rdmaps__now_ns() - t0;
	cr_assert(took >= 250000000u && took < 1500000000u, "a silent gateway held the call %.2f s",
		  (double)took * 1e-9);

	/* nobody listening */
	struct srv_etcd e;
	char err[128];
	cr_assert_eq(srv_etcd_parse(&e, "http://127.0.0.1:1", err, sizeof(err)), 0);
	cr_assert_eq(srv_etcd_post(&e, "/v3/kv/range", "{}", out, sizeof(out), 1000, why, sizeof(why)),
		     RDMAPS_ECONNECT);
}
